# render_job.rb JOB PROPERTIES_JSON OUT_DIR: every template of JOB rendered
# into OUT_DIR at its destination path, as the agent lays out a job.
require 'fileutils'
require_relative 'template_renderer'

job_name, properties, out = ARGV
job = JobTemplates.new(job_name)
job.spec['templates'].each do |source, destination|
  path = File.join(out, destination)
  FileUtils.mkdir_p(File.dirname(path))
  File.write(path, job.render(source, JSON.parse(properties)))
  File.chmod(destination.start_with?('bin/') ? 0o755 : 0o644, path)
end
