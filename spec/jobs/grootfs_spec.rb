# The grootfs job's templates, rendered as the director would render them.
require 'minitest/autorun'
require_relative '../support/template_renderer'

describe 'the grootfs job' do
  let(:job) { JobTemplates.new('grootfs') }
  let(:cert) { "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n" }
  let(:key) { "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n" }

  def config(template, properties = {})
    text = job.render(template, properties)
    # JSON, so grootfs reads it without a YAML parser; and valid YAML, as the contract says.
    assert_equal JSON.parse(text), YAML.safe_load(text)
    JSON.parse(text)
  end

  describe 'config/grootfs_config.yml' do
    it 'maps the defaults to the contract keys for the unprivileged store' do
      c = config('config/grootfs_config.yml.erb')
      assert_equal '/var/vcap/data/grootfs/store/unprivileged', c['store']
      assert_equal 'info', c['log_level']
      assert_equal '/var/vcap/sys/log/grootfs/grootfs.log', c['log_file']
      assert_equal '127.0.0.1:3457', c['metron_endpoint']
      assert_equal({ 'with_clean' => false, 'without_mount' => false, 'insecure_registries' => [],
                     'skip_layer_validation' => true,
                     'remote_layer_client_certificates_path' => '/var/vcap/jobs/grootfs/config/certs',
                     'clean_log_file' => '/var/vcap/sys/log/grootfs/grootfs.clean.log' }, c['create'])
      assert_equal({ 'threshold_bytes' => 0 }, c['clean'])
      assert_equal({ 'store_size_bytes' => 0, 'with_direct_io' => false }, c['init'])
    end

    it 'maps non-default properties' do
      c = config('config/grootfs_config.yml.erb', 'grootfs' => {
                   'log_level' => 'debug', 'skip_mount' => true, 'experimental_direct_io' => true,
                   'insecure_docker_registry_list' => ['registry.local:5000', 'mirror'],
                   'dropsonde_port' => 3458
                 })
      assert_equal 'debug', c['log_level']
      assert_equal true, c['create']['without_mount']
      assert_equal ['registry.local:5000', 'mirror'], c['create']['insecure_registries']
      assert_equal true, c['init']['with_direct_io']
      assert_equal '127.0.0.1:3458', c['metron_endpoint']
    end

    it 'writes volatile_rootfs only to turn volatile mounts off, in both stores' do
      %w[config/grootfs_config.yml.erb config/privileged_grootfs_config.yml.erb].each do |t|
        refute config(t)['create'].key?('volatile_rootfs'), t
        off = config(t, 'grootfs' => { 'volatile_rootfs' => false })
        assert_equal false, off['create']['volatile_rootfs'], t
      end
    end

    it 'uses only keys the image-plugin contract defines' do
      keys = %w[store log_level log_file metron_endpoint newuidmap_bin newgidmap_bin create clean init]
      nested = {
        'create' => %w[with_clean without_mount disk_limit_size_bytes exclude_image_from_quota
                       skip_layer_validation insecure_registries clean_log_file
                       remote_layer_client_certificates_path],
        'clean' => %w[threshold_bytes], 'init' => %w[store_size_bytes with_direct_io]
      }
      %w[config/grootfs_config.yml.erb config/privileged_grootfs_config.yml.erb].each do |t|
        c = config(t)
        assert_empty c.keys - keys, t
        nested.each { |section, allowed| assert_empty c[section].keys - allowed, "#{t} #{section}" }
      end
    end
  end

  describe 'config/privileged_grootfs_config.yml' do
    it 'points at the privileged store and its own logs' do
      c = config('config/privileged_grootfs_config.yml.erb', 'grootfs' => { 'log_level' => 'error' })
      assert_equal '/var/vcap/data/grootfs/store/privileged', c['store']
      assert_equal 'error', c['log_level']
      assert_equal '/var/vcap/sys/log/grootfs/privileged_grootfs.log', c['log_file']
      assert_equal '/var/vcap/sys/log/grootfs/privileged_grootfs.clean.log', c['create']['clean_log_file']
    end

    it 'differs from the unprivileged config only in its paths' do
      props = { 'grootfs' => { 'skip_mount' => true, 'insecure_docker_registry_list' => ['r:1'] } }
      a = config('config/grootfs_config.yml.erb', props)
      b = config('config/privileged_grootfs_config.yml.erb', props)
      strip = ->(c) { c.merge('store' => nil, 'log_file' => nil, 'create' => c['create'].merge('clean_log_file' => nil)) }
      assert_equal strip.call(a), strip.call(b)
    end
  end

  describe 'config/release.json' do
    it 'lists every declared property, with the spec defaults' do
      r = JSON.parse(job.render('config/release.json.erb'))
      assert_equal job.declared_properties.keys.sort, r.keys.sort
      job.declared_properties.each { |name, d| assert_equal d['default'], r[name], name }
    end

    it 'passes non-default values through and normalises the schedule' do
      r = JSON.parse(job.render('config/release.json.erb', 'grootfs' => {
                                  'reserved_space_for_other_jobs_in_mb' => -1, 'routine_gc' => true,
                                  'privileged_store_percent' => 50, 'require_quota' => true,
                                  'tls' => { 'cert' => cert, 'key' => key },
                                  'clean' => { 'schedule' => '0  */2 * * 1-5', 'threshold_in_mb' => 0 }
                                }))
      assert_equal(-1, r['grootfs.reserved_space_for_other_jobs_in_mb'])
      assert_equal true, r['grootfs.routine_gc']
      assert_equal 50, r['grootfs.privileged_store_percent']
      assert_equal '0 */2 * * 1-5', r['grootfs.clean.schedule']
      assert_equal 0, r['grootfs.clean.threshold_in_mb']
      assert_equal cert, r['grootfs.tls.cert']
    end

    JSON.parse(File.read(File.join(__dir__, '..', 'fixtures', 'invalid_properties.json'))).each do |c|
      it "refuses #{c['properties'].to_json}" do
        error = assert_raises(RuntimeError) { job.render('config/release.json.erb', c['properties']) }
        assert_equal c['error'], error.message
      end
    end
  end

  describe 'remote-layer certificates' do
    let(:both) { %w[config/grootfs_config.yml.erb config/privileged_grootfs_config.yml.erb] }

    it 'skips layer validation in both stores, as Garden\'s two-layer images need' do
      both.each { |t| assert_equal true, config(t)['create']['skip_layer_validation'], t }
    end

    it 'names the directory pre-start fills, with or without grootfs.tls properties' do
      [{}, { 'grootfs' => { 'tls' => { 'ca_cert' => cert } } },
       { 'grootfs' => { 'tls' => { 'cert' => cert, 'key' => key } } }].each do |props|
        both.each do |t|
          assert_equal '/var/vcap/jobs/grootfs/config/certs',
                       config(t, props)['create']['remote_layer_client_certificates_path'], t
        end
      end
    end

    it 'renders grootfs.tls.* under garden-runc-release\'s names into config/tls' do
      rendered = job.spec['templates'].values.grep(%r{^config/tls/}).sort
      assert_equal %w[config/tls/remote-layer.cert config/tls/remote-layer.crt config/tls/remote-layer.key], rendered
      props = { 'grootfs' => { 'tls' => { 'cert' => cert, 'key' => key, 'ca_cert' => cert } } }
      assert_equal cert, job.render('config/tls/remote-layer.cert.erb', props).chomp
      assert_equal key, job.render('config/tls/remote-layer.key.erb', props).chomp
      assert_equal cert, job.render('config/tls/remote-layer.crt.erb', props).chomp
    end

    it 'renders an unset property as an empty file (pre-start leaves it out of config/certs)' do
      %w[crt cert key].each { |ext| assert_equal '', job.render("config/tls/remote-layer.#{ext}.erb").strip }
      refute job.spec['templates'].values.any? { |f| f.start_with?('config/certs/') }, 'pre-start fills config/certs'
    end

    it 'refuses a client certificate without its key, and a key without its certificate' do
      [{ 'cert' => cert }, { 'key' => key }].each do |tls|
        error = assert_raises(RuntimeError) { job.render('config/release.json.erb', 'grootfs' => { 'tls' => tls }) }
        assert_equal 'grootfs.tls.cert and grootfs.tls.key must be set together', error.message
      end
    end
  end

  describe 'bin/pre-start' do
    it 'checks quotas unless grootfs.require_quota is turned off' do
      assert_match(/^\s*check_quotas$/, job.render('bin/pre-start.erb'))
      refute_match(/^\s*check_quotas$/, job.render('bin/pre-start.erb', 'grootfs' => { 'require_quota' => false }))
    end

    it 'prepares the configs before it initialises the stores' do
      text = job.render('bin/pre-start.erb')
      assert_operator text.index('grootfs_py.release prepare'), :<, text.index('init_stores')
    end
  end

  describe 'bin/clean' do
    it 'uses the sized threshold and a 30-minute deadline by default' do
      text = job.render('bin/clean.erb')
      assert_match(/^DEADLINE_SECONDS=1800$/, text)
      assert_match(/^THRESHOLD_ARGS=\(\)$/, text)
    end

    it 'passes a threshold in bytes and the deadline when set' do
      text = job.render('bin/clean.erb', 'grootfs' => { 'clean' => { 'threshold_in_mb' => 2, 'deadline_in_seconds' => 90 } })
      assert_match(/^DEADLINE_SECONDS=90$/, text)
      assert_match(/^THRESHOLD_ARGS=\(--threshold-bytes 2097152\)$/, text)
    end
  end

  describe 'bin/grootfs-server' do
    let(:utils) { job.render('bin/grootfs-utils.erb') }
    let(:monit) { File.read(File.join(RELEASE_ROOT, 'jobs', 'grootfs', 'monit')) }

    it 'keeps the socket and the pidfile monit watches in the run directory' do
      assert_match(%r{^RUN_DIR=/var/vcap/sys/run/grootfs$}, utils)
      assert_match(%r{^SOCKET="\$\{RUN_DIR\}/grootfs.sock"$}, utils)
      assert_match(%r{^SERVER_PIDFILE="\$\{RUN_DIR\}/grootfs-server.pid"$}, utils)
      assert_match(%r{^\s*with pidfile /var/vcap/sys/run/grootfs/grootfs-server.pid$}, monit)
      assert_match(%r{start program "/var/vcap/jobs/grootfs/bin/grootfs-server start"}, monit)
      assert_match(%r{stop program "/var/vcap/jobs/grootfs/bin/grootfs-server stop"}, monit)
    end

    it 'makes the run directory its owner\'s alone, then execs the server on the socket' do
      text = job.render('bin/grootfs-server.erb')
      assert_operator text.index('chmod 0700 "${RUN_DIR}"'), :<, text.index('exec "${GROOTFS}" serve')
      assert_match(/^\s*exec "\$\{GROOTFS\}" serve --socket "\$\{SOCKET\}" \\$/, text)
      assert_match(%r{>>"\$\{LOG_DIR\}/grootfs-server.stderr.log"}, text)
    end

    it 'runs the canary through the shim, with no fallback to hide a broken server' do
      text = job.render('bin/post-start.erb')
      assert_match(%r{^SHIM="\$\{PACKAGE_DIR\}/bin/grootfs-shim"$}, utils)
      assert_match(/"\$\{SHIM\}" --config "\$\{config\}" create/, text)
      refute_match(/"\$\{GROOTFS\}" --config/, text)
      assert_match(%r{GROOTFS_PYTHON_CLI=/nonexistent/}, text)
    end

    it 'renders as bash that parses' do
      IO.popen(%w[bash -n], 'r+') do |io|
        io.write(job.render('bin/grootfs-server.erb'))
        io.close_write
        io.read
      end
      assert $?.success?
    end
  end

  describe 'every template' do
    it 'renders with the defaults and reads only declared properties' do
      job.spec['templates'].each_key { |t| job.render(t) }
    end

    it 'fails for a property the spec does not declare' do
      assert_raises(UnknownProperty) do
        EvaluationContext.new({}, nil).p('grootfs.undeclared')
      end
    end

    it 'renders the shell scripts as bash that parses' do
      %w[bin/pre-start.erb bin/post-start.erb bin/clean.erb bin/grootfs-utils.erb].each do |t|
        IO.popen(%w[bash -n], 'r+') do |io|
          io.write(job.render(t))
          io.close_write
          io.read
        end
        assert $?.success?, "#{t} is not valid bash"
      end
    end
  end
end

describe 'the template harness' do
  let(:context) do
    EvaluationContext.new({ 'a.set' => 1, 'a.nil' => nil, 'a.false' => false }, nil)
  end

  it 'gives p the value, else its default, else an error, as BOSH does' do
    assert_equal 1, context.p('a.set')
    assert_equal false, context.p('a.false')
    assert_equal 7, context.p('a.nil', 7)
    assert_raises(UnknownProperty) { context.p('a.nil') }
    assert_equal 1, context.p(%w[a.nil a.set])
  end

  it 'runs if_p only when every property is set, and else otherwise' do
    seen = []
    context.if_p('a.set', 'a.false') { |x, y| seen << [x, y] }.else { seen << :else }
    context.if_p('a.set', 'a.nil') { seen << :never }.else { seen << :else }
    assert_equal [[1, false], :else], seen
  end
end
