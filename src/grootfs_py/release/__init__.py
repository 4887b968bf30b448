"""The BOSH release's Python side: property checks, store sizing, pre-start's files.

The job's ERB templates only map properties to files; what needs the cell
(the free space on its data disk, the backing files already there) runs at
pre-start as ``python -m grootfs_py.release prepare``. Nothing here is on
Garden's hot path: the ``grootfs`` command never imports this package.
"""
