/**
 * Load a config file once: parse (YAML, JSON or an `.mjs` module), expand `${ENV}`, validate
 * against the schema with every problem reported by key path, bound the durations, fill in
 * the schema's defaults, build each section (`build.ts`: references between sections and what
 * else a schema cannot check), and freeze.
 */
import { resolve as resolvePath } from 'node:path'
import { Value } from '@sinclair/typebox/value'
import { ValueErrorType, type ValueError } from '@sinclair/typebox/errors'
import type { TSchema } from '@sinclair/typebox'
import { ConfigSchema, type ResolvedInput } from './schema.js'
import { expandEnv } from './env.js'
import { durationProblem, durationProblems, DURATION_KIND } from './duration.js'
import { dependencyProblems, withDefaults } from './schema-walk.js'
import { buildConfig } from './build.js'
import type { Config } from './types.js'
import { ConfigError, readConfigSource } from './read.js'

export { ConfigError }

export interface Loaded {
  config: Config
  warnings: string[]
}

/** Read, validate and resolve the config file at `path`. Throws `ConfigError`. */
export async function loadConfigFile (path: string, env: NodeJS.ProcessEnv = process.env): Promise<Loaded> {
  const absolute = resolvePath(path)
  const raw = await readConfigSource(absolute)
  return resolveConfig(raw, { env, source: absolute })
}

export interface ResolveOptions {
  env?: NodeJS.ProcessEnv
  /** Where the config came from; relative `stateDir` resolves against its folder. */
  source?: string
}

/** Validate an already-parsed config object and resolve it. Throws `ConfigError`. */
export function resolveConfig (raw: unknown, options: ResolveOptions = {}): Loaded {
  const env = options.env ?? process.env
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
    throw new ConfigError(['(root): the configuration must be an object (a YAML/JSON mapping)'])
  }
  const problems: string[] = []
  const expanded = expandEnv(raw, env, problems)
  // Values that came from the environment are strings; convert where the schema wants a
  // number or a boolean (`port: ${PORT:-14001}`). Only strings: a `true` where a port belongs
  // is an error, not a 1.
  const input = convertStrings(expanded, Value.Convert(ConfigSchema, structuredClone(expanded)))
  const errors = [...Value.Errors(ConfigSchema, input)]
  for (const error of oneForMissing(errors)) problems.push(...variantProblems(error) ?? [describe(error)])
  problems.push(...durationProblems(ConfigSchema, input))
  problems.push(...dependencyProblems(ConfigSchema, input))
  const warnings: string[] = []
  let config: Config | null = null
  try {
    // Cross-section checks run even when the schema found problems, so one run lists them all.
    config = buildConfig(withDefaults(ConfigSchema, input) as ResolvedInput, options.source ?? null, { problems, warnings })
  } catch (err) {
    if (problems.length === 0) throw err
  }
  if (problems.length > 0 || config === null) throw new ConfigError(dedupe(problems))
  return { config: deepFreeze(config), warnings }
}

/** `/routes/0/match/pathPrefix` → `routes[0].match.pathPrefix` */
function keyPath (pointer: string): string {
  if (pointer === '') return '(root)'
  let out = ''
  for (const part of pointer.slice(1).split('/')) {
    const key = part.replace(/~1/g, '/').replace(/~0/g, '~')
    out += /^[0-9]+$/.test(key) ? `[${key}]` : (out === '' ? key : `.${key}`)
  }
  return out
}

/** A missing key is one problem, not also "must be a string" at the same path. */
function oneForMissing (errors: ValueError[]): ValueError[] {
  const missing = new Set(errors.filter((e) => e.type === ValueErrorType.ObjectRequiredProperty).map((e) => e.path))
  return errors.filter((e) => !missing.has(e.path) || e.type === ValueErrorType.ObjectRequiredProperty)
}

/**
 * A mapping that matches no variant of a union told apart by `type` (`rollback: {type: git, …}`):
 * the problems of the variant its `type` names, each at its own key, rather than "must be one of
 * the variants" for the whole mapping. Null when the union is not of that kind.
 */
function variantProblems (error: ValueError): string[] | null {
  const value = error.value as Record<string, unknown> | null
  const variants = (error.schema as { anyOf?: Array<{ properties?: Record<string, { const?: unknown }> }> }).anyOf
  if (error.type !== ValueErrorType.Union || value === null || typeof value !== 'object' || Array.isArray(value) || variants === undefined) return null
  const types = variants.map((v) => v.properties?.type?.const)
  if (types.length === 0 || types.some((t) => typeof t !== 'string')) return null
  const at = keyPath(error.path)
  const variant = variants[types.indexOf(value.type)]
  const names = types.map((t) => JSON.stringify(t)).join(', ')
  if (value.type === undefined) return [`${at}.type: is required (one of ${names})`]
  if (variant === undefined) return [`${at}.type: must be one of ${names} (got ${JSON.stringify(value.type)})`]
  const errors = [...Value.Errors(variant as TSchema, value)].map((e) => ({ ...e, path: `${error.path}${e.path}` }))
  const problems = oneForMissing(errors).map(describe)
  return problems.length > 0 ? problems : null
}

/** Keys whose values are secrets: a problem names the key, never the value. */
const SECRET = /^(notifications\.(slackWebhookUrl|pagerDutyRoutingKey|pagerDutyEscalationRoutingKey|statusPageApiKey|webhooks)|rollback\.(url|headers|repo)|tracing\.headers|fleet\.etcd\.password)/

function describe (error: ValueError): string {
  const s = error.schema as Record<string, unknown>
  const at = keyPath(error.path)
  if (SECRET.test(at)) {
    const problem = describeValue(error, s, at).replace(/ \(got .*\)$/s, '')
    return `${problem} (value not shown: it may be a secret)`
  }
  return describeValue(error, s, at)
}

function describeValue (error: ValueError, s: Record<string | symbol, unknown>, at: string): string {
  switch (error.type) {
    case ValueErrorType.ObjectAdditionalProperties:
      return `${at}: unknown key`
    case ValueErrorType.ObjectRequiredProperty:
      return `${at}: is required`
    case ValueErrorType.NumberMaximum:
    case ValueErrorType.IntegerMaximum:
      return `${at}: must be <= ${String(s.maximum)}`
    case ValueErrorType.NumberMinimum:
    case ValueErrorType.IntegerMinimum:
      return `${at}: must be >= ${String(s.minimum)}`
    case ValueErrorType.NumberExclusiveMinimum:
      return `${at}: must be > ${String(s.exclusiveMinimum)} (got ${JSON.stringify(error.value)})`
    case ValueErrorType.Integer:
      return `${at}: must be an integer`
    case ValueErrorType.Number:
      return `${at}: must be a number`
    case ValueErrorType.Boolean:
      return `${at}: must be true or false`
    case ValueErrorType.String:
      return `${at}: must be a string`
    case ValueErrorType.Object:
      return `${at}: must be a mapping`
    case ValueErrorType.Array:
      return `${at}: must be a list`
    case ValueErrorType.ArrayMinItems:
      return `${at}: must have at least ${String(s.minItems)} item(s)`
    case ValueErrorType.ObjectMinProperties:
      return `${at}: must have at least ${String(s.minProperties)} entr${s.minProperties === 1 ? 'y' : 'ies'}`
    case ValueErrorType.StringMinLength:
      return `${at}: must not be empty`
    case ValueErrorType.StringPattern:
      return `${at}: ${typeof s.description === 'string' ? `must be ${s.description}` : `must match ${String(s.pattern)}`} (got ${JSON.stringify(error.value)})`
    case ValueErrorType.Union: {
      if (s[DURATION_KIND] === true && typeof error.value === 'number') {
        const problem = durationProblem(at, error.value)
        if (problem !== null) return problem
      }
      const anyOf = s.anyOf as Array<Record<string | symbol, unknown>> | undefined
      if (anyOf?.some((o) => o[DURATION_KIND] === true) === true && anyOf.some((o) => o.const === false)) return `${at}: must be milliseconds, a string such as 30m, or false (got ${JSON.stringify(error.value)})`
      if (at === 'logging.accessLog') return `${at}: must be true, false or a sample rate from 0 to 1 (got ${JSON.stringify(error.value)})`
      const literals = (s.anyOf as Array<Record<string, unknown>> | undefined)?.map((o) => o.const).filter((c) => c !== undefined)
      if (literals !== undefined && literals.length > 0) return `${at}: must be one of ${literals.map((l) => JSON.stringify(l)).join(', ')} (got ${JSON.stringify(error.value)})`
      return `${at}: ${typeof s.description === 'string' ? `must be ${s.description}` : 'has the wrong type'} (got ${JSON.stringify(error.value)})`
    }
    default:
      return `${at}: ${error.message.toLowerCase()}`
  }
}

/** A number as a config writes one: digits, with a sign and a decimal part at most. */
const PLAIN_NUMBER = /^-?[0-9]+(\.[0-9]+)?$/

/**
 * Take a converted value only where the original was a string that became a number or boolean.
 * A number only from a string that reads as that very number: TypeBox's conversion parses as
 * it can, so `"1e3"` became the integer 1, `"0x10"` 16 and `"1.5"` 1 (a `timeoutMs: "1e3"` was a
 * 1 ms timeout); such a string is left as it is, for the schema to refuse by its key.
 */
function convertStrings (original: unknown, converted: unknown): unknown {
  if (typeof original === 'string') {
    if (typeof converted === 'boolean') return converted
    return typeof converted === 'number' && PLAIN_NUMBER.test(original) && Number(original) === converted ? converted : original
  }
  if (Array.isArray(original)) return Array.isArray(converted) ? original.map((v, i) => convertStrings(v, converted[i])) : original
  if (original !== null && typeof original === 'object') {
    if (converted === null || typeof converted !== 'object' || Array.isArray(converted)) return original
    const out: Record<string, unknown> = {}
    for (const [k, v] of Object.entries(original)) out[k] = convertStrings(v, (converted as Record<string, unknown>)[k])
    return out
  }
  return original
}

function dedupe (problems: string[]): string[] {
  return [...new Set(problems)]
}

function deepFreeze<T> (value: T): T {
  // A Buffer (a static fallback body) cannot be frozen; nothing writes to it.
  if (value !== null && typeof value === 'object' && !Object.isFrozen(value) && !ArrayBuffer.isView(value)) {
    Object.freeze(value)
    for (const item of Object.values(value as Record<string, unknown>)) deepFreeze(item)
  }
  return value
}
