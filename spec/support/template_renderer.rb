# Renders a job's ERB templates the way the BOSH director does, without the
# bosh CLI or the bosh-template gem: the job spec's defaults merged under the
# manifest's properties, and `p`, `if_p` and `spec` with BOSH's semantics.
require 'erb'
require 'json'
require 'ostruct'
require 'yaml'

RELEASE_ROOT = File.expand_path('../..', __dir__)

class UnknownProperty < StandardError; end

class JobTemplates
  attr_reader :spec

  def initialize(job)
    @dir = File.join(RELEASE_ROOT, 'jobs', job)
    @spec = YAML.safe_load(File.read(File.join(@dir, 'spec')))
  end

  def declared_properties
    @spec.fetch('properties', {})
  end

  # The rendered text of templates/<source>.
  def render(source, properties = {}, instance = {})
    text = File.read(File.join(@dir, 'templates', source))
    context = EvaluationContext.new(effective_properties(properties), instance_spec(instance))
    ERB.new(text, trim_mode: '-').result(context.get_binding)
  end

  private

  # As the director does: only declared properties reach a template, each
  # the manifest's value or else the spec's default.
  def effective_properties(manifest)
    declared_properties.each_with_object({}) do |(name, definition), out|
      found, value = dig(manifest, name)
      out[name] = found ? value : (definition || {})['default']
    end
  end

  def dig(hash, dotted)
    dotted.split('.').reduce([true, hash]) do |(found, node), key|
      return [false, nil] unless found && node.is_a?(Hash) && node.key?(key)

      [true, node[key]]
    end
  end

  def instance_spec(overrides)
    base = {
      'name' => 'diego-cell', 'id' => 'f5e8c3a2-0000-4000-8000-000000000001', 'index' => 0,
      'az' => 'z1', 'deployment' => 'cf', 'bootstrap' => true, 'address' => '10.0.16.5',
      'ip' => '10.0.16.5', 'networks' => { 'default' => { 'ip' => '10.0.16.5' } }
    }
    JSON.parse(base.merge(overrides).to_json, object_class: OpenStruct)
  end
end

class EvaluationContext
  class IfP
    def initialize(active)
      @active = active
    end

    def else
      yield unless @active
    end
  end

  UNSET = Object.new

  attr_reader :spec

  def initialize(properties, spec)
    @properties = properties
    @spec = spec
  end

  def get_binding
    binding
  end

  # p(name), p(name, default), p([names...], default): the first that is set.
  def p(names, default = UNSET)
    Array(names).each do |name|
      raise UnknownProperty, "Can't find property '#{name}'" unless @properties.key?(name)

      value = @properties[name]
      return value unless value.nil?
    end
    return default unless default.equal?(UNSET)

    raise UnknownProperty, "Can't find property '#{Array(names).inspect}'"
  end

  # Yields the values when every named property is set, else runs `else`.
  def if_p(*names)
    values = names.map do |name|
      raise UnknownProperty, "Can't find property '#{name}'" unless @properties.key?(name)

      @properties[name]
    end
    active = values.none?(&:nil?)
    yield(*values) if active
    IfP.new(active)
  end
end
