/**
 * From a validated input with its defaults filled in (`ResolvedInput`) to the `Config` the rest
 * of Breakwater reads, one function per config section. Each turns durations into
 * milliseconds and absent keys into `null`, and checks what a schema cannot: references
 * between sections (a route's upstream, a trigger's flags), names, and combinations. Defaults
 * are not here: they are declared in the schema.
 *
 * Every check pushes its problem and carries on, so one run lists every problem; a value the
 * schema already refused is tolerated (a malformed duration reads as 0) for the same reason.
 */
import { existsSync } from 'node:fs'
import { resolve as resolvePath, dirname } from 'node:path'
import { pathToFileURL } from 'node:url'
import { durationMs } from './duration.js'
import { readFlagFileSync, notBooleanProblem, flagKeysRead } from './flag-file.js'
import { readTlsFilesSync, validityProblem } from './tls-files.js'
import { checkRoutingPolicy } from './routing-policy.js'
import { normalisePath } from './request-path.js'
import { fleetConfig } from './fleet.js'
import { checkFailover, fallbackConfig, rateLimitConfig, trustedProxies, warnUnengagedFailover } from './rungs.js'
import type { CircuitBreakerSchema, MatchSchema, Resolved, ResolvedInput, RollbackSchema, RouteSchema, TriggerSchema, UpstreamSchema } from './schema.js'
import type { CircuitBreakerConfig, Config, FlagProviderConfig, FlagSourceConfig, TracingConfig, LogLevel, NotificationsConfig, ProxyListenerConfig, RollbackConfig, RouteConfig, TriggerConfig, UpstreamConfig, UpstreamTlsConfig, VerificationConfig } from './types.js'

/** Problems (the config is refused) and warnings (it is used) found while building. */
export interface Findings {
  problems: string[]
  warnings: string[]
}

type Section<K extends keyof ResolvedInput> = ResolvedInput[K]

/** How `Config` spells "no limit" for a cap whose key is absent (the schema has no default for it). */
const UNLIMITED = 0
/** `upstreams.X.healthCheck.timeoutMs` when not given, unless `intervalMs` is shorter. */
const HEALTH_CHECK_TIMEOUT_MS = 2000

/** The whole config. `source` is the file it came from; relative paths resolve against its folder. */
export function buildConfig (input: ResolvedInput, source: string | null, found: Findings): Config {
  const baseDir = source === null ? process.cwd() : dirname(source)
  const upstreamNames = Object.keys(input.upstreams)
  const upstreams = buildUpstreams(input.upstreams, baseDir, found)
  checkFailover(input.upstreams, found.problems)
  const routes = buildRoutes(input.routes, upstreamNames, input, baseDir, found)
  checkRoutingPolicy(routes, input, found.problems, found.warnings)
  const circuitBreakers = buildCircuitBreakers(input.circuitBreakers, upstreamNames, found)
  warnUnengagedFailover(upstreams, circuitBreakers, found.warnings)
  const flagSource = buildFlagSource(input.flagSource, baseDir)
  const fileFlags = flagSource === null ? null : peekFlagFile(flagSource.path, flagKeysRead(input), found.problems, found.warnings)
  const flagProvider = buildFlagProvider(input.flagProvider, baseDir, found)
  // A provider's flags are known only once it runs: it may define any flag.
  const defined = (flag: string): boolean => input.featureFlags[flag] !== undefined || fileFlags?.has(flag) === true || flagProvider !== null
  const where = flagSource === null ? '' : ' or the flag file'
  input.routes.forEach((r, i) => {
    if (r.killSwitch !== undefined && !defined(r.killSwitch)) found.problems.push(`routes[${i}].killSwitch: flag "${r.killSwitch}" is not defined in featureFlags${where}`)
  })
  return {
    source,
    service: input.service,
    version: input.version,
    stateDir: resolvePath(baseDir, input.stateDir),
    listen: buildListen(input.listen, baseDir, found),
    upstreams,
    routes,
    featureFlags: input.featureFlags,
    flagSource,
    flagProvider,
    tracing: buildTracing(input.tracing, input.service, baseDir, found),
    fleet: fleetConfig(input.fleet, (p) => resolvePath(baseDir, p), found.problems),
    flags: { targetingKeyHeader: input.flags.targetingKeyHeader.toLowerCase() },
    circuitBreakers,
    rollbackTriggers: buildTriggers(input.rollbackTriggers, { routes, upstreamNames, defined, where, rollback: input.rollback !== undefined }, found),
    verification: buildVerification(input.verification, routes, baseDir, found),
    notifications: buildNotifications(input.notifications, found),
    admin: { tokenFile: input.admin.tokenFile === undefined ? null : resolvePath(baseDir, input.admin.tokenFile) },
    rollback: input.rollback === undefined ? null : buildRollback(input.rollback),
    health: buildHealth(input.health, upstreams, found),
    shutdown: buildShutdown(input.shutdown, found),
    logging: {
      level: input.logging.level as LogLevel,
      accessLogRate: input.logging.accessLog === true ? 1 : input.logging.accessLog === false ? 0 : input.logging.accessLog
    },
    limits: {
      maxInFlight: input.limits.maxInFlight ?? UNLIMITED,
      maxConnections: input.limits.maxConnections ?? UNLIMITED,
      maxEventLoopDelayMs: durationMs(input.limits.maxEventLoopDelayMs)
    }
  }
}

function buildUpstreams (input: Section<'upstreams'>, baseDir: string, found: Findings): Record<string, UpstreamConfig> {
  const upstreams: Record<string, UpstreamConfig> = {}
  for (const [name, u] of Object.entries(input)) {
    const built = buildUpstream(name, u, baseDir, found)
    if (built !== null) upstreams[name] = built
  }
  return upstreams
}

function buildUpstream (name: string, u: Resolved<typeof UpstreamSchema>, baseDir: string, found: Findings): UpstreamConfig | null {
  const at = `upstreams.${name}`
  if ((u.url === undefined) === (u.endpoints === undefined)) {
    found.problems.push(`${at}: needs exactly one of url or endpoints`)
    return null
  }
  const endpoints: string[] = []
  const urls = u.url !== undefined ? [u.url] : (u.endpoints as string[])
  urls.forEach((text, i) => {
    const key = u.url !== undefined ? `${at}.url` : `${at}.endpoints[${i}]`
    let url: URL
    try {
      url = new URL(text)
    } catch {
      found.problems.push(`${key}: not a valid URL`)
      return
    }
    if (url.pathname !== '/' || url.search !== '' || url.username !== '') {
      found.problems.push(`${key}: must be an origin (scheme, host and port only), got ${text}`)
      return
    }
    if (endpoints.includes(url.origin)) found.problems.push(`${key}: duplicate endpoint ${url.origin}`)
    endpoints.push(url.origin)
  })
  const hc = u.healthCheck
  const hcTimeoutMs = hc === undefined ? 0 : hc.timeoutMs === undefined ? Math.min(HEALTH_CHECK_TIMEOUT_MS, durationMs(hc.intervalMs)) : durationMs(hc.timeoutMs)
  if (hc !== undefined && hcTimeoutMs > durationMs(hc.intervalMs)) found.problems.push(`${at}.healthCheck.timeoutMs: must not exceed intervalMs`)
  return {
    name,
    endpoints,
    critical: u.critical,
    healthCheck: hc === undefined
      ? null
      : { path: hc.path, intervalMs: durationMs(hc.intervalMs), timeoutMs: hcTimeoutMs, unhealthyThreshold: hc.unhealthyThreshold, healthyThreshold: hc.healthyThreshold },
    connectTimeoutMs: durationMs(u.connectTimeoutMs),
    keepAliveTimeoutMs: durationMs(u.keepAliveTimeoutMs),
    connections: u.connections,
    balance: u.balance,
    ejection: {
      consecutiveFailures: u.ejection.consecutiveFailures,
      baseMs: durationMs(u.ejection.baseMs),
      maxMs: durationMs(u.ejection.maxMs),
      panicThresholdPercent: u.ejection.panicThresholdPercent
    },
    failover: u.failover ?? null,
    failbackAfterMs: durationMs(u.failbackAfter),
    tls: buildUpstreamTls(u.tls, endpoints, at, baseDir, found.problems)
  }
}

/** `upstreams.NAME.tls`: only for https:// endpoints; a client certificate comes with its key, and they match. */
function buildUpstreamTls (t: Resolved<typeof UpstreamSchema>['tls'], endpoints: readonly string[], at: string, baseDir: string, problems: string[]): UpstreamTlsConfig | null {
  if (t === undefined) return null
  const plain = endpoints.filter((e) => e.startsWith('http://'))
  if (plain.length > 0) problems.push(`${at}.tls: set for plain http:// endpoints (${plain.join(', ')}); use https://`)
  if ((t.cert === undefined) !== (t.key === undefined)) problems.push(`${at}.tls: cert and key go together (a client certificate needs its private key)`)
  const file = (path: string | undefined): string | null => path === undefined ? null : resolvePath(baseDir, path)
  const tls = { ca: file(t.ca), cert: file(t.cert), key: file(t.key), servername: t.servername ?? null, rejectUnauthorized: t.rejectUnauthorized }
  readTlsFilesSync(tls, `${at}.tls`, problems)
  return tls
}

function buildRoutes (input: Section<'routes'>, upstreamNames: readonly string[], config: ResolvedInput, baseDir: string, found: Findings): RouteConfig[] {
  const taken = new Set<string>()
  return input.map((r, i) => {
    const at = `routes[${i}]`
    if (typeof r.upstream === 'string' && !upstreamNames.includes(r.upstream)) {
      found.problems.push(`${at}.upstream: unknown upstream "${r.upstream}" (known: ${upstreamNames.join(', ')})`)
    }
    if (r.match.path !== undefined && r.match.pathPrefix !== undefined) found.problems.push(`${at}.match: use either path or pathPrefix, not both`)
    if (r.rewritePrefix !== undefined && r.match.pathPrefix === undefined) found.problems.push(`${at}.rewritePrefix: needs match.pathPrefix`)
    const name = routeName(r, at, taken, found)
    if (r.fault?.flag !== undefined && config.featureFlags[r.fault.flag] === undefined && config.flagSource === undefined && config.flagProvider === undefined) {
      found.problems.push(`${at}.fault.flag: flag "${r.fault.flag}" is not defined in featureFlags`)
    }
    if (r.fault !== undefined && r.fault.delayPercent > 0 && durationMs(r.fault.delayMs) === 0) found.problems.push(`${at}.fault.delayMs: needed with delayPercent`)
    return buildRoute(r, name, at, baseDir, found)
  })
}

/** The route's name, or one derived from its match; a duplicate derived name gets a suffix. */
function routeName (r: Resolved<typeof RouteSchema>, at: string, taken: Set<string>, found: Findings): string {
  let name = r.name ?? deriveRouteName(r.match)
  if (r.name !== undefined && taken.has(name)) found.problems.push(`${at}.name: duplicate route name "${name}"`)
  for (let n = 2; taken.has(name); n++) name = `${r.name ?? deriveRouteName(r.match)}_${n}`
  taken.add(name)
  return name
}

function buildRoute (r: Resolved<typeof RouteSchema>, name: string, at: string, baseDir: string, found: Findings): RouteConfig {
  const m = r.match
  return {
    name,
    match: {
      pathPrefix: m.pathPrefix === undefined ? null : routePath(m.pathPrefix, `${at}.match.pathPrefix`, m.strict, found),
      path: m.path === undefined ? null : routePath(m.path, `${at}.match.path`, m.strict, found),
      methods: m.methods === undefined ? null : m.methods.map((method) => method.toUpperCase()),
      host: m.host === undefined ? null : m.host.toLowerCase().replace(/\.(?=$|:\d+$)/, ''), // as hostMatches compares it
      headers: m.headers === undefined ? null : Object.entries(m.headers).map(([k, v]) => [k.toLowerCase(), v] as const),
      strict: m.strict
    },
    upstream: r.upstream,
    listener: r.listener,
    killSwitch: r.killSwitch ?? null,
    timeoutMs: durationMs(r.timeoutMs),
    idleTimeoutMs: durationMs(r.idleTimeoutMs),
    retries: r.retries === undefined ? null : { attempts: r.retries.attempts, budgetPercent: r.retries.budgetPercent, minRetriesPerSecond: r.retries.minRetriesPerSecond },
    rewritePrefix: r.rewritePrefix ?? null,
    fault: r.fault === undefined
      ? null
      : { abortPercent: r.fault.abortPercent, abortStatus: r.fault.abortStatus, delayPercent: r.fault.delayPercent, delayMs: durationMs(r.fault.delayMs), flag: r.fault.flag ?? null },
    rateLimit: rateLimitConfig(r.rateLimit),
    fallback: fallbackConfig(r.fallback, m.methods, at, baseDir, found.problems, found.warnings)
  }
}

/**
 * A route's `path` or `pathPrefix` as requests are matched (SPEC §14: paths are normalised
 * before matching). Written otherwise (`/%7Euser`, `/a//b`, `/x/./y`), the route would never
 * match, and its kill switch would guard nothing while the requests went to the routes after
 * it: it is normalised, with a warning. One no request can match is a problem: an invalid
 * escape, `#` or `\`, and in a non-strict route `;` parameters or a query, which matching ignores.
 */
function routePath (value: string, key: string, strict: boolean, found: Findings): string {
  const normalised = normalisePath(value)
  if (normalised === null) {
    found.problems.push(`${key}: "${value}" is not a path a request can have (an invalid %-escape, "#" or "\\")`)
    return value
  }
  if (!strict && /[;?]/.test(normalised)) {
    found.problems.push(`${key}: "${value}" never matches: matching ignores ";" parameters and the query (set match.strict to compare them)`)
    return value
  }
  if (normalised !== value) found.warnings.push(`${key}: "${value}" is matched as "${normalised}": request paths are normalised before matching`)
  return normalised
}

/** A stable, readable route name from its match: `/checkout` → `checkout`, `/` → `root`. */
function deriveRouteName (match: Resolved<typeof MatchSchema>): string {
  const path = match.path ?? match.pathPrefix ?? '/'
  let base = path.replace(/^\/+|\/+$/g, '').replace(/[^A-Za-z0-9_.-]+/g, '_') || 'root'
  if (match.host !== undefined) base = `${match.host.replace(/[^A-Za-z0-9_.-]+/g, '_')}_${base}`
  if (match.methods !== undefined) base = `${base}_${match.methods.join('_').toLowerCase()}`
  return /^[A-Za-z_]/.test(base) ? base.slice(0, 64) : `r_${base}`.slice(0, 64)
}

function buildCircuitBreakers (input: Section<'circuitBreakers'>, upstreamNames: readonly string[], found: Findings): Record<string, CircuitBreakerConfig> {
  const breakers: Record<string, CircuitBreakerConfig> = {}
  for (const [name, cb] of Object.entries(input) as Array<[string, Resolved<typeof CircuitBreakerSchema>]>) {
    if (!upstreamNames.includes(name)) found.problems.push(`circuitBreakers.${name}: unknown upstream "${name}" (known: ${upstreamNames.join(', ')})`)
    const rollingWindowMs = durationMs(cb.rollingWindowMs)
    if (rollingWindowMs < 100) found.problems.push(`circuitBreakers.${name}.rollingWindowMs: must be >= 100`)
    breakers[name] = {
      failureThreshold: cb.failureThreshold,
      volumeThreshold: cb.volumeThreshold,
      rollingWindowMs,
      recoveryTimeout: durationMs(cb.recoveryTimeout),
      maxConcurrentRequests: cb.maxConcurrentRequests ?? UNLIMITED,
      failureStatuses: cb.failureStatuses
    }
  }
  return breakers
}

function buildFlagSource (input: Section<'flagSource'>, baseDir: string): FlagSourceConfig | null {
  if (input === undefined) return null
  return { type: input.type, path: resolvePath(baseDir, input.path), pollIntervalMs: durationMs(input.pollIntervalMs) }
}

/**
 * The boolean flags a flag file defines now, for checking references; null when it cannot be
 * read (a missing file is allowed at start: the sidecar starts on `featureFlags`).
 */
function peekFlagFile (path: string, used: Set<string>, problems: string[], warnings: string[]): Set<string> | null {
  const read = readFlagFileSync(path)
  if (read.kind === 'missing') {
    warnings.push(`flagSource.path: ${path} does not exist yet; starting on featureFlags and watching for it`)
    return null
  }
  if (read.kind === 'invalid') {
    problems.push(`flagSource.path: ${path} is not a valid flag file: ${read.error}`)
    return null
  }
  const notBoolean = notBooleanProblem(read.flags, used)
  if (notBoolean !== null) problems.push(`flagSource.path: ${path} is not a valid flag file: ${notBoolean}`)
  for (const key of read.flags.disabled) {
    warnings.push(`flagSource: flag "${key}" is DISABLED in ${path}; flagd resolves a DISABLED flag to the code default (featureFlags, else true = on), so it does NOT switch the feature off — use defaultVariant: "off"`)
  }
  return new Set([...read.flags.values.keys(), ...read.flags.disabled, ...read.flags.targeted])
}

function buildTracing (t: Section<'tracing'>, service: string, baseDir: string, found: Findings): TracingConfig | null {
  if (t === undefined) return null
  let ca: string | null = null
  let caPem: string | null = null
  if (t.tls !== undefined) {
    if (!t.otlpEndpoint.startsWith('https://')) found.problems.push(`tracing.tls: set for a plain http:// otlpEndpoint (${t.otlpEndpoint}); use https://`)
    ca = resolvePath(baseDir, t.tls.ca)
    caPem = readTlsFilesSync({ ca, cert: null, key: null }, 'tracing.tls', found.problems)?.ca?.toString('utf8') ?? null
  }
  const maxSize = t.batch.maxSize ?? Math.min(512, t.maxQueueSize)
  if (maxSize > t.maxQueueSize) found.problems.push(`tracing.batch.maxSize: ${maxSize} is more than tracing.maxQueueSize (${t.maxQueueSize})`)
  const timeoutMs = durationMs(t.batch.timeoutMs)
  if (timeoutMs === 0) found.problems.push('tracing.batch.timeoutMs: must be more than 0')
  // OTLP/HTTP: an endpoint without a path gets the traces signal's path (OTEL_EXPORTER_OTLP_ENDPOINT's rule).
  const url = new URL(t.otlpEndpoint)
  const otlpEndpoint = url.pathname === '/' && url.search === '' ? `${url.origin}/v1/traces` : t.otlpEndpoint
  return {
    otlpEndpoint,
    sampleRatio: t.sampleRatio,
    serviceName: t.serviceName ?? service,
    protocol: t.protocol,
    headers: t.headers,
    tls: { ca, caPem },
    maxQueueSize: t.maxQueueSize,
    batch: { maxSize, delayMs: durationMs(t.batch.delayMs), timeoutMs }
  }
}

/**
 * `flagProvider.module` must resolve now, as `import()` will resolve it at start: a package
 * name from Breakwater's own node_modules, or a module path relative to the config file.
 */
function buildFlagProvider (p: Section<'flagProvider'>, baseDir: string, found: Findings): FlagProviderConfig | null {
  if (p === undefined) return null
  let module = p.module
  if (/^(\.{1,2}\/|\/)/.test(module)) {
    const file = resolvePath(baseDir, module)
    if (!existsSync(file)) found.problems.push(`flagProvider.module: ${file} does not exist`)
    module = pathToFileURL(file).href
  } else {
    try {
      import.meta.resolve(module)
    } catch (err) {
      found.problems.push(`flagProvider.module: cannot find "${module}" (${(err as Error).message.split('\n')[0] ?? ''}); install it beside Breakwater`)
    }
  }
  return { module, export: p.export, options: p.options, pollMs: p.pollMs === undefined ? null : durationMs(p.pollMs) }
}

/** What a trigger may refer to. */
interface TriggerScope {
  routes: readonly RouteConfig[]
  upstreamNames: readonly string[]
  /** Whether a flag is defined (in `featureFlags` or the flag file). */
  defined: (flag: string) => boolean
  /** ` or the flag file` when there is one, for problem messages. */
  where: string
  rollback: boolean
}

function buildTriggers (input: Section<'rollbackTriggers'>, scope: TriggerScope, found: Findings): TriggerConfig[] {
  const names = new Set<string>()
  return input.map((tr, i) => {
    const at = `rollbackTriggers[${i}]`
    const name = tr.name ?? `${tr.metric}_${String(tr.threshold).replace(/[^0-9A-Za-z]/g, '_')}_${typeof tr.window === 'number' ? `${tr.window}ms` : tr.window}`
    if (names.has(name)) found.problems.push(`${at}.name: duplicate trigger name "${name}"${tr.name === undefined ? ' (give the triggers names)' : ''}`)
    names.add(name)
    checkTrigger(tr, at, scope, found.problems)
    return {
      name,
      metric: tr.metric,
      threshold: tr.threshold,
      windowMs: durationMs(tr.window),
      action: tr.action,
      minRequests: tr.minRequests,
      forMs: durationMs(tr.for),
      route: tr.route ?? null,
      upstream: tr.upstream ?? null,
      flags: tr.flags ?? null,
      upstreams: tr.upstreams ?? null
    }
  })
}

function checkTrigger (tr: Resolved<typeof TriggerSchema>, at: string, scope: TriggerScope, problems: string[]): void {
  const windowMs = durationMs(tr.window)
  if (windowMs < 1000) problems.push(`${at}.window: must be at least 1s`)
  if (windowMs > 3_600_000) problems.push(`${at}.window: must be at most 1h`)
  if (tr.metric === 'error_rate' && tr.threshold > 1) problems.push(`${at}.threshold: an error_rate threshold is a ratio from 0 to 1`)
  if (tr.route !== undefined && !scope.routes.some((r) => r.name === tr.route)) problems.push(`${at}.route: unknown route "${tr.route}" (known: ${scope.routes.map((r) => r.name).join(', ')})`)
  if (tr.upstream !== undefined && !scope.upstreamNames.includes(tr.upstream)) problems.push(`${at}.upstream: unknown upstream "${tr.upstream}"`)
  if (tr.action === 'killSwitch' && (tr.flags === undefined || tr.flags.length === 0)) problems.push(`${at}.flags: a killSwitch trigger must name its flags`)
  for (const f of tr.flags ?? []) if (!scope.defined(f)) problems.push(`${at}.flags: flag "${f}" is not defined in featureFlags${scope.where}`)
  for (const u of tr.upstreams ?? []) if (!scope.upstreamNames.includes(u)) problems.push(`${at}.upstreams: unknown upstream "${u}"`)
  if (tr.action === 'rollback' && !scope.rollback) problems.push(`${at}.action: "rollback" needs a rollback action (config key rollback)`)
}

function buildVerification (v: Section<'verification'>, routes: readonly RouteConfig[], baseDir: string, found: Findings): VerificationConfig {
  let clientCert: VerificationConfig['clientCert'] = null
  if (v.clientCert !== undefined) {
    clientCert = { cert: resolvePath(baseDir, v.clientCert.cert), key: resolvePath(baseDir, v.clientCert.key) }
    readTlsFilesSync({ ...clientCert, ca: null }, 'verification.clientCert', found.problems)
  }
  return {
    clientCert,
    synthetics: v.synthetics.map((syn, i) => {
      if (syn.route !== undefined && !routes.some((r) => r.name === syn.route)) found.problems.push(`verification.synthetics[${i}].route: unknown route "${syn.route}"`)
      return { route: syn.route ?? null, method: syn.method, path: syn.path, host: syn.host ?? null, expectStatus: syn.expectStatus }
    }),
    intervalMs: durationMs(v.intervalMs),
    successes: v.successes,
    windowMs: durationMs(v.windowMs),
    timeoutMs: durationMs(v.timeoutMs),
    maxErrorRate: v.maxErrorRate
  }
}

function buildNotifications (n: Section<'notifications'>, found: Findings): NotificationsConfig {
  if (n.slackWebhookUrl !== undefined && n.slackChannel === undefined) found.warnings.push('notifications.slackChannel: not set; Slack messages go to the webhook\'s default channel')
  if (n.statusPageId !== undefined && n.statusPageApiKey === undefined) found.problems.push('notifications.statusPageApiKey: needed with statusPageId')
  if (n.pagerDutyServiceId !== undefined && n.pagerDutyRoutingKey === undefined) found.warnings.push('notifications.pagerDutyRoutingKey: not set; PagerDuty events are not sent')
  // The channel names where messages go; only the incoming webhook URL sends them.
  if (n.slackChannel !== undefined && n.slackWebhookUrl === undefined) found.warnings.push(`notifications.slackWebhookUrl: not set; Slack messages to ${n.slackChannel} are not sent`)
  return {
    slackChannel: n.slackChannel ?? null,
    slackWebhookUrl: n.slackWebhookUrl ?? null,
    pagerDutyServiceId: n.pagerDutyServiceId ?? null,
    pagerDutyRoutingKey: n.pagerDutyRoutingKey ?? null,
    pagerDutyEscalationRoutingKey: n.pagerDutyEscalationRoutingKey ?? null,
    escalateAfterMs: durationMs(n.escalateAfter),
    pagerDutyUrl: n.pagerDutyUrl,
    statusPageId: n.statusPageId ?? null,
    statusPageApiKey: n.statusPageApiKey ?? null,
    statusPageUrl: n.statusPageUrl.replace(/\/+$/, ''),
    webhooks: n.webhooks,
    queueSize: n.queueSize,
    maxAttempts: n.maxAttempts,
    alertmanager: n.alertmanager === undefined ? null : { urls: n.alertmanager.urls.map((u) => u.replace(/\/+$/, '')), labels: n.alertmanager.labels, repeatIntervalMs: durationMs(n.alertmanager.repeatInterval) }
  }
}

function buildListen (listen: Section<'listen'>, baseDir: string, found: Findings): Config['listen'] {
  const proxy = (l: NonNullable<Section<'listen'>['egress']>, at: string): ProxyListenerConfig => ({
    host: l.host,
    port: l.port,
    keepAliveTimeoutMs: durationMs(l.keepAliveTimeoutMs),
    requestTimeoutMs: durationMs(l.requestTimeoutMs),
    headersTimeoutMs: durationMs(l.headersTimeoutMs),
    maxHeaderSize: l.maxHeaderSize,
    maxHeadersCount: l.maxHeadersCount,
    trustedProxies: trustedProxies(l.trustedProxies, at, found.problems),
    acceptors: l.acceptors,
    tls: buildListenerTls(l.tls, `${at}.tls`, baseDir, found)
  })
  const built = {
    proxy: proxy(listen.proxy, 'listen.proxy'),
    egress: listen.egress === undefined ? null : proxy(listen.egress, 'listen.egress'),
    ops: { host: listen.ops.host, port: listen.ops.port },
    admin: { host: listen.admin.host, port: listen.admin.port }
  }
  sharedPorts(built, found.problems)
  return built
}

const WILDCARD_HOSTS = new Set(['0.0.0.0', '::', '[::]', ''])
/** `localhost` binds a loopback address, 127.0.0.1 or ::1 as the resolver answers: it overlaps either. */
const LOOPBACK_HOSTS = new Set(['localhost', '127.0.0.1', '::1', '[::1]'])

/** Whether listeners on hosts `a` and `b` (one port) would take the same address. */
function overlaps (a: string, b: string): boolean {
  const [x, y] = [a, b].map((h) => h.toLowerCase().replace(/\.$/, '')) as [string, string]
  if (x === y || WILDCARD_HOSTS.has(x) || WILDCARD_HOSTS.has(y)) return true
  return (x === 'localhost' || y === 'localhost') && LOOPBACK_HOSTS.has(x) && LOOPBACK_HOSTS.has(y)
}

/**
 * Two of our own listeners on one port would fail at start as "address already in use", sending
 * whoever reads it to look for another process: named here by key instead. Port 0 (any free
 * port) never collides; a wildcard host overlaps every address.
 */
function sharedPorts (listen: Config['listen'], problems: string[]): void {
  const seen: Array<{ key: string, host: string, port: number }> = []
  for (const key of ['proxy', 'egress', 'ops', 'admin'] as const) {
    const l = listen[key]
    if (l === null || l.port === 0) continue
    const other = seen.find((s) => s.port === l.port && overlaps(s.host, l.host))
    if (other !== undefined) problems.push(`listen.${key}.port: ${l.port} is also listen.${other.key}'s port (${other.host}); each listener needs its own`)
    seen.push({ key: `${key}`, host: l.host, port: l.port })
  }
}

/** A listener's certificate files, read and checked now so a bad pair never reaches start-up. */
function buildListenerTls (t: NonNullable<Section<'listen'>['egress']>['tls'], at: string, baseDir: string, found: Findings): ProxyListenerConfig['tls'] {
  if (t === undefined) return null
  // Mutual TLS verifies client certificates against a CA of the operator's, never the system's.
  if (t.requestClientCert && t.ca === undefined) found.problems.push(`${at}.ca: needed with requestClientCert (the CA that signs client certificates)`)
  const tls = { cert: resolvePath(baseDir, t.cert), key: resolvePath(baseDir, t.key), ca: t.ca === undefined ? null : resolvePath(baseDir, t.ca), requestClientCert: t.requestClientCert }
  const material = readTlsFilesSync(tls, at, found.problems)
  // Served anyway (a client that does not verify still gets through), but said at start and by validate.
  const invalid = material?.cert === undefined ? null : validityProblem(material.cert, at, tls.cert)
  if (invalid !== null) found.warnings.push(`${invalid}: clients that verify it refuse every connection; replace the files (they are re-read when they change)`)
  return tls
}

function buildRollback (r: Resolved<typeof RollbackSchema>): RollbackConfig {
  const common = {
    cooldownMs: durationMs(r.cooldown),
    requireRecentChangeMs: r.requireRecentChange === false ? 0 : durationMs(r.requireRecentChange)
  }
  if (r.type === 'webhook') return { ...common, type: 'webhook', url: r.url, headers: r.headers, retries: r.retries, timeoutMs: durationMs(r.timeoutMs) }
  if (r.type === 'git') return { ...common, type: 'git', repo: r.repo, branch: r.branch, path: r.path ?? null, author: r.author ?? null, timeoutMs: durationMs(r.timeoutMs) }
  return { ...common, type: 'exec', command: r.command, timeoutMs: durationMs(r.timeoutMs) }
}

/** Kubernetes' default grace from SIGTERM to SIGKILL, less 5 s for the exit itself (SPEC §2: 25 s). */
const DEFAULT_GRACE_BUDGET_MS = 25_000

function buildShutdown (shutdown: Section<'shutdown'>, found: Findings): Config['shutdown'] {
  const drainDelayMs = durationMs(shutdown.drainDelayMs)
  const timeoutMs = durationMs(shutdown.timeoutMs)
  if (drainDelayMs + timeoutMs > DEFAULT_GRACE_BUDGET_MS) {
    found.warnings.push(`shutdown: drainDelayMs + timeoutMs is ${(drainDelayMs + timeoutMs) / 1000} s, past the ${DEFAULT_GRACE_BUDGET_MS / 1000} s that fit Kubernetes' default 30 s grace: raise the pod's terminationGracePeriodSeconds past it, or the kubelet kills the drain`)
  }
  return { drainDelayMs, timeoutMs }
}

function buildHealth (health: Section<'health'>, upstreams: Readonly<Record<string, UpstreamConfig>>, found: Findings): Config['health'] {
  if (health.failOnOpenCircuit === 'any') {
    found.warnings.push('health.failOnOpenCircuit: "any" makes every sidecar of the fleet unhealthy when one shared dependency fails; prefer "critical"')
  }
  const criticals = Object.values(upstreams).filter((u) => u.critical).map((u) => u.name)
  if (criticals.length > 1) {
    found.warnings.push(`upstreams: ${criticals.length} upstreams are critical (${criticals.join(', ')}); each can take this instance out of the load balancer`)
  }
  return { failOnOpenCircuit: health.failOnOpenCircuit }
}
