/**
 * Load a config file once: parse (YAML, JSON or an `.mjs` module), expand `${ENV}`, validate
 * against the schema with every problem reported by key path, check what a schema cannot
 * (references between sections), fill in defaults, and freeze.
 */
import { readFile } from 'node:fs/promises'
import { extname, resolve as resolvePath, dirname } from 'node:path'
import { pathToFileURL } from 'node:url'
import { parse as parseYaml } from 'yaml'
import { Value } from '@sinclair/typebox/value'
import { ValueErrorType, type ValueError } from '@sinclair/typebox/errors'
import { ConfigSchema, type ConfigInput } from './schema.js'
import { expandEnv } from './env.js'
import { toMs as parseMs } from './duration.js'
import { fleetConfig } from './fleet.js'
import type { CircuitBreakerConfig, Config, LogLevel, NotificationsConfig, RollbackConfig, RouteConfig, TriggerConfig, UpstreamConfig } from './types.js'
import { readFlagFileSync } from '../flags/flagd-file.js'
import { checkRoutingPolicy } from './routing-policy.js'

/** A config that cannot be used; `problems` holds one line per problem, each naming its key path. */
/**
 * A duration in ms; 0 for a value the schema has already reported as malformed, so the
 * cross-section checks still run and one pass lists every problem.
 */
function toMs (value: number | string): number {
  try {
    return parseMs(value)
  } catch {
    return 0
  }
}

export class ConfigError extends Error {
  readonly problems: readonly string[]
  constructor (problems: string[]) {
    super(problems.length === 1 ? problems[0] as string : `${problems.length} problems in the configuration:\n${problems.join('\n')}`)
    this.name = 'ConfigError'
    this.problems = problems
  }
}

export interface Loaded {
  config: Config
  warnings: string[]
}

/** Read, validate and resolve the config file at `path`. Throws `ConfigError`. */
export async function loadConfigFile (path: string, env: NodeJS.ProcessEnv = process.env): Promise<Loaded> {
  const absolute = resolvePath(path)
  const raw = await readRaw(absolute)
  return resolveConfig(raw, { env, source: absolute })
}

async function readRaw (path: string): Promise<unknown> {
  const ext = extname(path).toLowerCase()
  if (ext === '.mjs' || ext === '.js') {
    let mod: Record<string, unknown>
    try {
      mod = await import(`${pathToFileURL(path).href}?t=${Date.now()}`) as Record<string, unknown>
    } catch (err) {
      throw new ConfigError([`${path}: cannot load module: ${(err as Error).message}`])
    }
    const exported = mod.default ?? mod.config
    return typeof exported === 'function' ? await (exported as () => unknown)() : exported
  }
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    throw new ConfigError([`${path}: ${code === 'ENOENT' ? 'file not found' : `cannot read: ${(err as Error).message}`}`])
  }
  try {
    if (ext === '.json') return JSON.parse(text)
    if (ext === '.yaml' || ext === '.yml' || ext === '') return parseYaml(text, { prettyErrors: true })
  } catch (err) {
    throw new ConfigError([`${path}: not valid ${ext === '.json' ? 'JSON' : 'YAML'}: ${(err as Error).message.split('\n')[0]}`])
  }
  throw new ConfigError([`${path}: unsupported config file type "${ext}" (use .yaml, .yml, .json or .mjs)`])
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
  // A missing key is one problem, not also "must be a string" at the same path.
  const missing = new Set(errors.filter((e) => e.type === ValueErrorType.ObjectRequiredProperty).map((e) => e.path))
  for (const error of errors) if (!missing.has(error.path) || error.type === ValueErrorType.ObjectRequiredProperty) problems.push(describe(error))
  const warnings: string[] = []
  let config: Config | null = null
  try {
    // Cross-section checks run even when the schema found problems, so one run lists them all.
    config = build(input as ConfigInput, options.source ?? null, problems, warnings)
  } catch (err) {
    if (problems.length === 0) throw err
  }
  if (problems.length > 0 || config === null) throw new ConfigError(dedupe(problems))
  return { config: deepFreeze(config), warnings }
}

function build (input: ConfigInput, source: string | null, problems: string[], warnings: string[]): Config {
  const baseDir = source === null ? process.cwd() : dirname(source)
  const upstreams: Record<string, UpstreamConfig> = {}
  for (const [name, u] of Object.entries(input.upstreams)) {
    const at = `upstreams.${name}`
    if ((u.url === undefined) === (u.endpoints === undefined)) {
      problems.push(`${at}: needs exactly one of url or endpoints`)
      continue
    }
    const endpoints: string[] = []
    const urls = u.url !== undefined ? [u.url] : (u.endpoints as string[])
    urls.forEach((text, i) => {
      const key = u.url !== undefined ? `${at}.url` : `${at}.endpoints[${i}]`
      let url: URL
      try {
        url = new URL(text)
      } catch {
        problems.push(`${key}: not a valid URL`)
        return
      }
      if (url.pathname !== '/' || url.search !== '' || url.username !== '') {
        problems.push(`${key}: must be an origin (scheme, host and port only), got ${text}`)
        return
      }
      if (endpoints.includes(url.origin)) problems.push(`${key}: duplicate endpoint ${url.origin}`)
      endpoints.push(url.origin)
    })
    const hc = u.healthCheck
    const ej = u.ejection ?? {}
    upstreams[name] = {
      name,
      endpoints,
      critical: u.critical ?? false,
      healthCheck: hc === undefined
        ? null
        : {
            path: hc.path,
            intervalMs: toMs(hc.intervalMs ?? 5000),
            timeoutMs: toMs(hc.timeoutMs ?? 2000),
            unhealthyThreshold: hc.unhealthyThreshold ?? 3,
            healthyThreshold: hc.healthyThreshold ?? 2
          },
      connectTimeoutMs: toMs(u.connectTimeoutMs ?? 5000),
      keepAliveTimeoutMs: toMs(u.keepAliveTimeoutMs ?? 4000),
      connections: u.connections ?? 128,
      balance: u.balance ?? 'round_robin',
      ejection: {
        consecutiveFailures: ej.consecutiveFailures ?? 7,
        baseMs: toMs(ej.baseMs ?? 1000),
        maxMs: toMs(ej.maxMs ?? 60_000),
        panicThresholdPercent: ej.panicThresholdPercent ?? 50
      }
    }
    if (hc !== undefined && toMs(hc.timeoutMs ?? 2000) > toMs(hc.intervalMs ?? 5000)) {
      problems.push(`${at}.healthCheck.timeoutMs: must not exceed intervalMs`)
    }
  }

  const routes: RouteConfig[] = []
  const taken = new Set<string>()
  input.routes.forEach((r, i) => {
    const at = `routes[${i}]`
    if (typeof r.upstream === 'string' && upstreams[r.upstream] === undefined && input.upstreams?.[r.upstream] === undefined) {
      problems.push(`${at}.upstream: unknown upstream "${r.upstream}" (known: ${Object.keys(input.upstreams).join(', ')})`)
    }
    if (r.match.path !== undefined && r.match.pathPrefix !== undefined) {
      problems.push(`${at}.match: use either path or pathPrefix, not both`)
    }
    if (r.rewritePrefix !== undefined && r.match.pathPrefix === undefined) {
      problems.push(`${at}.rewritePrefix: needs match.pathPrefix`)
    }
    let name = r.name ?? deriveRouteName(r.match)
    if (r.name !== undefined && taken.has(name)) problems.push(`${at}.name: duplicate route name "${name}"`)
    for (let n = 2; taken.has(name); n++) name = `${r.name ?? deriveRouteName(r.match)}_${n}`
    taken.add(name)
    routes.push({
      name,
      match: {
        pathPrefix: r.match.pathPrefix ?? null,
        path: r.match.path ?? null,
        methods: r.match.methods === undefined ? null : r.match.methods.map((m) => m.toUpperCase()),
        host: r.match.host?.toLowerCase() ?? null,
        headers: r.match.headers === undefined
          ? null
          : Object.entries(r.match.headers).map(([k, v]) => [k.toLowerCase(), v] as const),
        strict: r.match.strict ?? false
      },
      upstream: r.upstream,
      listener: r.listener ?? 'proxy',
      killSwitch: r.killSwitch ?? null,
      timeoutMs: toMs(r.timeoutMs ?? 15_000),
      idleTimeoutMs: toMs(r.idleTimeoutMs ?? 60_000),
      retries: r.retries === undefined
        ? null
        : {
            attempts: r.retries.attempts,
            budgetPercent: r.retries.budgetPercent ?? 20,
            minRetriesPerSecond: r.retries.minRetriesPerSecond ?? 10
          },
      rewritePrefix: r.rewritePrefix ?? null,
      fault: r.fault === undefined
        ? null
        : {
            abortPercent: r.fault.abortPercent ?? 0,
            abortStatus: r.fault.abortStatus ?? 503,
            delayPercent: r.fault.delayPercent ?? 0,
            delayMs: toMs(r.fault.delayMs ?? 0),
            flag: r.fault.flag ?? null
          }
    })
    if (r.fault?.flag !== undefined && (input.featureFlags ?? {})[r.fault.flag] === undefined && input.flagSource === undefined) {
      problems.push(`${at}.fault.flag: flag "${r.fault.flag}" is not defined in featureFlags`)
    }
    if (r.fault !== undefined && (r.fault.delayPercent ?? 0) > 0 && toMs(r.fault.delayMs ?? 0) === 0) problems.push(`${at}.fault.delayMs: needed with delayPercent`)
  })

  checkRoutingPolicy(routes, input, problems, warnings)

  const circuitBreakers: Record<string, CircuitBreakerConfig> = {}
  for (const [name, cb] of Object.entries(input.circuitBreakers ?? {})) {
    if (input.upstreams[name] === undefined) {
      problems.push(`circuitBreakers.${name}: unknown upstream "${name}" (known: ${Object.keys(input.upstreams).join(', ')})`)
    }
    circuitBreakers[name] = {
      failureThreshold: cb.failureThreshold ?? 0.5,
      volumeThreshold: cb.volumeThreshold ?? 20,
      rollingWindowMs: toMs(cb.rollingWindowMs ?? 10_000),
      recoveryTimeout: toMs(cb.recoveryTimeout ?? 30_000),
      maxConcurrentRequests: cb.maxConcurrentRequests ?? 0,
      failureStatuses: cb.failureStatuses ?? [500, 502, 503, 504]
    }
    if (circuitBreakers[name].rollingWindowMs < 100) problems.push(`circuitBreakers.${name}.rollingWindowMs: must be >= 100`)
  }

  const flagSource = input.flagSource === undefined
    ? null
    : { type: input.flagSource.type, path: resolvePath(baseDir, input.flagSource.path), pollIntervalMs: toMs(input.flagSource.pollIntervalMs ?? 250) }
  const featureFlags = input.featureFlags ?? {}
  const fileFlags = flagSource === null ? null : peekFlagFile(flagSource.path, warnings)
  input.routes.forEach((r, i) => {
    if (r.killSwitch === undefined || featureFlags[r.killSwitch] !== undefined || fileFlags?.has(r.killSwitch) === true) return
    problems.push(`routes[${i}].killSwitch: flag "${r.killSwitch}" is not defined in featureFlags${flagSource === null ? '' : ' or the flag file'}`)
  })

  const rollbackTriggers: TriggerConfig[] = []
  const triggerNames = new Set<string>()
  ;(input.rollbackTriggers ?? []).forEach((tr, i) => {
    const at = `rollbackTriggers[${i}]`
    const windowMs = toMs(tr.window)
    const name = tr.name ?? `${tr.metric}_${String(tr.threshold).replace(/[^0-9A-Za-z]/g, '_')}_${typeof tr.window === 'number' ? `${tr.window}ms` : tr.window}`
    if (triggerNames.has(name)) problems.push(`${at}.name: duplicate trigger name "${name}"${tr.name === undefined ? ' (give the triggers names)' : ''}`)
    triggerNames.add(name)
    if (windowMs < 1000) problems.push(`${at}.window: must be at least 1s`)
    if (windowMs > 3_600_000) problems.push(`${at}.window: must be at most 1h`)
    if (tr.metric === 'error_rate' && tr.threshold > 1) problems.push(`${at}.threshold: an error_rate threshold is a ratio from 0 to 1`)
    if (tr.route !== undefined && !input.routes.some((r, j) => (r.name ?? routes[j]?.name) === tr.route)) problems.push(`${at}.route: unknown route "${tr.route}" (known: ${routes.map((r) => r.name).join(', ')})`)
    if (tr.upstream !== undefined && input.upstreams[tr.upstream] === undefined) problems.push(`${at}.upstream: unknown upstream "${tr.upstream}"`)
    if (tr.action === 'killSwitch' && (tr.flags === undefined || tr.flags.length === 0)) problems.push(`${at}.flags: a killSwitch trigger must name its flags`)
    for (const f of tr.flags ?? []) if (featureFlags[f] === undefined && fileFlags?.has(f) !== true) problems.push(`${at}.flags: flag "${f}" is not defined in featureFlags${flagSource === null ? '' : ' or the flag file'}`)
    for (const u of tr.upstreams ?? []) if (input.upstreams[u] === undefined) problems.push(`${at}.upstreams: unknown upstream "${u}"`)
    if (tr.action === 'rollback' && input.rollback === undefined) problems.push(`${at}.action: "rollback" needs a rollback action (config key rollback)`)
    rollbackTriggers.push({
      name,
      metric: tr.metric,
      threshold: tr.threshold,
      windowMs,
      action: tr.action,
      minRequests: tr.minRequests ?? 20,
      forMs: toMs(tr.for ?? 0),
      route: tr.route ?? null,
      upstream: tr.upstream ?? null,
      flags: tr.flags ?? null,
      upstreams: tr.upstreams ?? null
    })
  })
  const v = input.verification ?? {}
  const verification = {
    synthetics: (v.synthetics ?? []).map((syn, i) => {
      if (syn.route !== undefined && !routes.some((r) => r.name === syn.route)) problems.push(`verification.synthetics[${i}].route: unknown route "${syn.route}"`)
      return { route: syn.route ?? null, method: syn.method ?? 'GET', path: syn.path, host: syn.host ?? null, expectStatus: syn.expectStatus ?? 200 }
    }),
    intervalMs: toMs(v.intervalMs ?? 1000),
    successes: v.successes ?? 3,
    windowMs: toMs(v.windowMs ?? 10_000),
    timeoutMs: toMs(v.timeoutMs ?? 300_000),
    maxErrorRate: v.maxErrorRate ?? 0.05
  }
  const n = input.notifications ?? {}
  const notifications: NotificationsConfig = {
    slackChannel: n.slackChannel ?? null,
    slackWebhookUrl: n.slackWebhookUrl ?? null,
    pagerDutyServiceId: n.pagerDutyServiceId ?? null,
    pagerDutyRoutingKey: n.pagerDutyRoutingKey ?? null,
    pagerDutyUrl: n.pagerDutyUrl ?? 'https://events.pagerduty.com/v2/enqueue',
    statusPageId: n.statusPageId ?? null,
    statusPageApiKey: n.statusPageApiKey ?? null,
    statusPageUrl: (n.statusPageUrl ?? 'https://api.statuspage.io').replace(/\/+$/, ''),
    webhooks: n.webhooks ?? [],
    queueSize: n.queueSize ?? 1000,
    maxAttempts: n.maxAttempts ?? 5,
    alertmanager: n.alertmanager === undefined ? null : { urls: n.alertmanager.urls.map((u) => u.replace(/\/+$/, '')), labels: n.alertmanager.labels ?? {}, repeatIntervalMs: toMs(n.alertmanager.repeatInterval ?? 60_000) }
  }
  if (n.slackWebhookUrl !== undefined && n.slackChannel === undefined) warnings.push('notifications.slackChannel: not set; Slack messages go to the webhook\'s default channel')
  if (n.statusPageId !== undefined && n.statusPageApiKey === undefined) problems.push('notifications.statusPageApiKey: needed with statusPageId')
  if (n.pagerDutyServiceId !== undefined && n.pagerDutyRoutingKey === undefined) warnings.push('notifications.pagerDutyRoutingKey: not set; PagerDuty events are not sent')

  const listen = input.listen ?? {}
  const proxy = listen.proxy ?? {}
  const proxyListener = (l: typeof proxy, port: number) => ({
    host: l.host ?? '0.0.0.0',
    port: l.port ?? port,
    keepAliveTimeoutMs: toMs(l.keepAliveTimeoutMs ?? 75_000),
    requestTimeoutMs: toMs(l.requestTimeoutMs ?? 0),
    headersTimeoutMs: toMs(l.headersTimeoutMs ?? 60_000),
    maxHeaderSize: l.maxHeaderSize ?? 16_384
  })

  const failOnOpenCircuit = input.health?.failOnOpenCircuit ?? 'critical'
  if (failOnOpenCircuit === 'any') {
    warnings.push('health.failOnOpenCircuit: "any" makes every sidecar of the fleet unhealthy when one shared dependency fails; prefer "critical"')
  }
  const criticals = Object.values(upstreams).filter((u) => u.critical).map((u) => u.name)
  if (criticals.length > 1) {
    warnings.push(`upstreams: ${criticals.length} upstreams are critical (${criticals.join(', ')}); each can take this instance out of the load balancer`)
  }

  const accessLog = input.logging?.accessLog ?? true
  return {
    source,
    service: input.service,
    version: input.version ?? 'dev',
    stateDir: resolvePath(baseDir, input.stateDir ?? './.breakwater'),
    listen: {
      proxy: proxyListener(proxy, 14001),
      egress: listen.egress === undefined ? null : proxyListener(listen.egress, 14002),
      ops: { host: listen.ops?.host ?? '0.0.0.0', port: listen.ops?.port ?? 14020 },
      admin: { host: listen.admin?.host ?? '127.0.0.1', port: listen.admin?.port ?? 14000 }
    },
    upstreams,
    routes,
    featureFlags,
    flagSource,
    circuitBreakers,
    rollbackTriggers,
    verification,
    notifications,
    fleet: fleetConfig(input.fleet, (p) => resolvePath(baseDir, p), problems),
    admin: { tokenFile: input.admin?.tokenFile === undefined ? null : resolvePath(baseDir, input.admin.tokenFile) },
    rollback: rollbackConfig(input.rollback),
    health: { failOnOpenCircuit },
    shutdown: {
      drainDelayMs: toMs(input.shutdown?.drainDelayMs ?? 5000),
      timeoutMs: toMs(input.shutdown?.timeoutMs ?? 30_000)
    },
    logging: {
      level: (input.logging?.level ?? 'info') as LogLevel,
      accessLogRate: accessLog === true ? 1 : accessLog === false ? 0 : accessLog
    },
    limits: {
      maxInFlight: input.limits?.maxInFlight ?? 0,
      maxConnections: input.limits?.maxConnections ?? 0,
      maxEventLoopDelayMs: toMs(input.limits?.maxEventLoopDelayMs ?? 1000)
    }
  }
}

/**
 * The boolean flags a flag file defines now, for checking `killSwitch` references; null when
 * it cannot be read (a missing file is allowed at start: the sidecar starts on `featureFlags`).
 */
function peekFlagFile (path: string, warnings: string[]): Set<string> | null {
  const read = readFlagFileSync(path)
  if (read.kind === 'missing') {
    warnings.push(`flagSource.path: ${path} does not exist yet; starting on featureFlags and watching for it`)
    return null
  }
  if (read.kind === 'invalid') {
    warnings.push(`flagSource.path: ${path} is not a valid flag file (${read.error}); starting on featureFlags`)
    return null
  }
  for (const key of read.flags.disabled) {
    warnings.push(`flagSource: flag "${key}" is DISABLED in ${path}; flagd resolves a DISABLED flag to the code default (featureFlags, else true = on), so it does NOT switch the feature off — use defaultVariant: "off"`)
  }
  return new Set([...read.flags.values.keys(), ...read.flags.disabled])
}

function rollbackConfig (r: ConfigInput['rollback']): RollbackConfig | null {
  if (r === undefined) return null
  const recent = r.requireRecentChange ?? '30m'
  const common = {
    cooldownMs: toMs(r.cooldown ?? '10m'),
    requireRecentChangeMs: recent === false ? 0 : toMs(recent)
  }
  if (r.type === 'webhook') return { ...common, type: 'webhook', url: r.url, headers: r.headers ?? {}, retries: r.retries ?? 3, timeoutMs: toMs(r.timeoutMs ?? 10_000) }
  return { ...common, type: 'exec', command: r.command, timeoutMs: toMs(r.timeoutMs ?? 60_000) }
}

/** A stable, readable route name from its match: `/checkout` → `checkout`, `/` → `root`. */
function deriveRouteName (match: ConfigInput['routes'][number]['match']): string {
  const path = match.path ?? match.pathPrefix ?? '/'
  let base = path.replace(/^\/+|\/+$/g, '').replace(/[^A-Za-z0-9_.-]+/g, '_') || 'root'
  if (match.host !== undefined) base = `${match.host.replace(/[^A-Za-z0-9_.-]+/g, '_')}_${base}`
  if (match.methods !== undefined) base = `${base}_${match.methods.join('_').toLowerCase()}`
  return /^[A-Za-z_]/.test(base) ? base.slice(0, 64) : `r_${base}`.slice(0, 64)
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

/** Keys whose values are secrets: a problem names the key, never the value. */
const SECRET = /^(notifications\.(slackWebhookUrl|pagerDutyRoutingKey|statusPageApiKey|webhooks)|rollback\.(url|headers)|fleet\.etcd\.password)/

function describe (error: ValueError): string {
  const s = error.schema as Record<string, unknown>
  const at = keyPath(error.path)
  if (SECRET.test(at)) {
    const problem = describeValue(error, s, at).replace(/ \(got .*\)$/s, '')
    return `${problem} (value not shown: it may be a secret)`
  }
  return describeValue(error, s, at)
}

function describeValue (error: ValueError, s: Record<string, unknown>, at: string): string {
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
      if (at === 'logging.accessLog') return `${at}: must be true, false or a sample rate from 0 to 1 (got ${JSON.stringify(error.value)})`
      const literals = (s.anyOf as Array<Record<string, unknown>> | undefined)?.map((o) => o.const).filter((c) => c !== undefined)
      if (literals !== undefined && literals.length > 0) return `${at}: must be one of ${literals.map((l) => JSON.stringify(l)).join(', ')} (got ${JSON.stringify(error.value)})`
      return `${at}: ${typeof s.description === 'string' ? `must be ${s.description}` : 'has the wrong type'} (got ${JSON.stringify(error.value)})`
    }
    default:
      return `${at}: ${error.message.toLowerCase()}`
  }
}

/** Take a converted value only where the original was a string that became a number or boolean. */
function convertStrings (original: unknown, converted: unknown): unknown {
  if (typeof original === 'string') return typeof converted === 'number' || typeof converted === 'boolean' ? converted : original
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
  if (value !== null && typeof value === 'object' && !Object.isFrozen(value)) {
    Object.freeze(value)
    for (const item of Object.values(value as Record<string, unknown>)) deepFreeze(item)
  }
  return value
}
