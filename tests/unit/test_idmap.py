import pytest

from grootfs_py.errors import InvalidArgumentError
from grootfs_py.idmap import IdMap, IdMapping, map_arguments

GARDEN = IdMap(
    (IdMapping(0, 4294967294, 1), IdMapping(1, 1, 4294967293)),
    (IdMapping(0, 4294967294, 1), IdMapping(1, 1, 4294967293)),
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0:4294967294:1", IdMapping(0, 4294967294, 1)),
        ("1:1:4294967293", IdMapping(1, 1, 4294967293)),
    ],
)
def test_parse_accepts_ns_host_size(text, expected):
    assert IdMapping.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text", ["", "1:2", "a:b:c", "0:0:0", "-1:0:1", "0:4294967295:2", "1:2:3:4"]
)
def test_parse_rejects_malformed_mappings(text):
    with pytest.raises(InvalidArgumentError, match="invalid id mapping"):
        IdMapping.parse(text)


@pytest.mark.parametrize(
    ("ns_id", "host_id"), [(0, 4294967294), (1, 1), (1000, 1000), (4294967293, 4294967293)]
)
def test_garden_mappings_translate_root_to_nobody(ns_id, host_id):
    assert GARDEN.host_uid(ns_id) == host_id
    assert GARDEN.host_gid(ns_id) == host_id


def test_unmapped_id_is_an_error():
    with pytest.raises(InvalidArgumentError, match="uid 4294967294 is not mapped"):
        GARDEN.host_uid(4294967294)


def test_no_mappings_is_identity():
    assert IdMap().host_uid(1234) == 1234
    assert IdMap().root_uid == 0


def test_overlapping_ranges_are_refused():
    with pytest.raises(InvalidArgumentError, match="overlap"):
        IdMap.of((IdMapping(0, 100, 10), IdMapping(5, 200, 10)), ())


def test_json_round_trip():
    assert IdMap.from_json(GARDEN.to_json()) == GARDEN


def test_inside_a_namespace_the_same_ranges_map_to_themselves():
    rootless = IdMap.of(
        (IdMapping(0, 1001, 1), IdMapping(1, 300000, 65536)),
        (IdMapping(0, 1002, 1), IdMapping(1, 400000, 65536)),
    )
    inside = rootless.inside()
    assert (inside.host_uid(0), inside.host_uid(1), inside.host_uid(65536)) == (0, 1, 65536)
    assert inside.host_gid(42) == 42
    with pytest.raises(InvalidArgumentError, match="uid 65537 is not mapped"):
        inside.host_uid(65537)


def test_map_arguments_are_newuidmaps_triples():
    mappings = (IdMapping(0, 1001, 1), IdMapping(1, 300000, 65536))
    assert map_arguments(mappings) == ["0", "1001", "1", "1", "300000", "65536"]
