/**
 * The resolved configuration: every default filled in, durations in milliseconds, frozen.
 * This, not the raw input, is what the rest of Breakwater reads.
 */

export interface ListenerConfig {
  host: string
  port: number
}

export interface ProxyListenerConfig extends ListenerConfig {
  keepAliveTimeoutMs: number
  /** Node's whole-request timeout; 0 = off (a long upload is not an error). */
  requestTimeoutMs: number
  headersTimeoutMs: number
  maxHeaderSize: number
  /** More request header fields than this is 431 (Envoy's and HAProxy's default is about 100). */
  maxHeadersCount: number
  /** Addresses and CIDRs of proxies whose `x-forwarded-for` entries are believed (SPEC §17). */
  trustedProxies: readonly string[]
  /**
   * Listening sockets on the port (SO_REUSEPORT), where Node and the OS share a port (server.ts
   * `REUSE_PORT`); one elsewhere. Node accepts one connection per event-loop turn and socket.
   */
  acceptors: number
  /** Null: plain HTTP. */
  tls: ListenerTlsConfig | null
}

/** A listener's certificate files (absolute paths), re-read when they change (SPEC §18). */
export interface ListenerTlsConfig {
  cert: string
  key: string
  ca: string | null
  /** Mutual TLS: a client without a certificate signed by `ca` is refused in the handshake. */
  requestClientCert: boolean
}

/** How `https://` endpoints are connected to (SPEC §18); files are absolute paths. */
export interface UpstreamTlsConfig {
  ca: string | null
  cert: string | null
  key: string | null
  servername: string | null
  rejectUnauthorized: boolean
}

export interface HealthCheckConfig {
  path: string
  intervalMs: number
  timeoutMs: number
  unhealthyThreshold: number
  healthyThreshold: number
}

export interface EjectionConfig {
  consecutiveFailures: number
  baseMs: number
  maxMs: number
  panicThresholdPercent: number
}

export interface UpstreamConfig {
  name: string
  /** Origins, e.g. `http://10.0.0.5:8080`. */
  endpoints: readonly string[]
  critical: boolean
  healthCheck: HealthCheckConfig | null
  connectTimeoutMs: number
  keepAliveTimeoutMs: number
  connections: number
  balance: 'round_robin' | 'least_request'
  ejection: EjectionConfig
  /** The upstream that takes this one's traffic while it is unavailable (SPEC §17); one hop only. */
  failover: string | null
  /** How long this upstream must have been available again before its traffic returns. */
  failbackAfterMs: number
  /** Null: the system's CAs, no client certificate (and plain HTTP for `http://` endpoints). */
  tls: UpstreamTlsConfig | null
}

export interface RetryConfig {
  attempts: number
  budgetPercent: number
  minRetriesPerSecond: number
}

export interface MatchConfig {
  pathPrefix: string | null
  path: string | null
  methods: readonly string[] | null
  host: string | null
  headers: ReadonlyArray<readonly [string, string]> | null
  /**
   * Match the normalised path exactly as spelled; by default case, `;` segment parameters and
   * one trailing slash are ignored (SPEC §15).
   */
  strict: boolean
}

/** The listener a route serves: the public proxy port, or the app's own outbound calls. */
export type Listener = 'proxy' | 'egress'

export interface FaultConfig {
  abortPercent: number
  abortStatus: number
  delayPercent: number
  delayMs: number
  /** When set, the fault is injected only while this flag is on (switch it at run time). */
  flag: string | null
}

export interface RouteConfig {
  name: string
  match: MatchConfig
  upstream: string
  /** Only requests on this listener reach the route (SPEC §15). */
  listener: Listener
  /** Flag key: when the flag is false the route is refused with `feature_disabled`. */
  killSwitch: string | null
  timeoutMs: number
  idleTimeoutMs: number
  retries: RetryConfig | null
  rewritePrefix: string | null
  /** Fault injection for game days; null = none (the default). */
  fault: FaultConfig | null
  /** Token-bucket shedding (SPEC §17); null = none. */
  rateLimit: RateLimitConfig | null
  /** What to answer instead of a refusal or an upstream failure (SPEC §17); null = none. */
  fallback: FallbackConfig | null
}

/** A route's token buckets: `burst` tokens, refilled at `requestsPerSecond`. */
export interface RateLimitConfig {
  requestsPerSecond: number
  burst: number
  /** One bucket for the route, one per client address, or one per value of a request header. */
  key: 'route' | 'client' | `header:${string}`
  /** At most this many buckets; the least recently used is evicted. */
  maxKeys: number
}

export interface FallbackCacheConfig {
  maxEntries: number
  maxBytes: number
  /** Responses with larger bodies are not stored. */
  maxEntryBytes: number
}

export interface FallbackConfig {
  /** Serve the last good 200 up to this old; 0 = no stale answers. */
  staleIfErrorMs: number
  cache: FallbackCacheConfig | null
  /** The static answer when there is no stale one; null = none. */
  static: StaticFallbackConfig | null
}

export interface StaticFallbackConfig {
  status: number
  /** The body (a `file` is read once, at load). */
  body: Buffer
  contentType: string
  headers: ReadonlyArray<readonly [string, string]>
}

export interface CircuitBreakerConfig {
  /** Failure ratio (0–1) that opens the circuit once `volumeThreshold` requests were seen. */
  failureThreshold: number
  volumeThreshold: number
  rollingWindowMs: number
  /** Milliseconds open before half-open. */
  recoveryTimeout: number
  /** Bulkhead: requests in flight allowed to the upstream; 0 = unlimited. */
  maxConcurrentRequests: number
  failureStatuses: readonly number[]
}

export interface FlagSourceConfig {
  type: 'flagd-file'
  /** Absolute path. */
  path: string
  pollIntervalMs: number
}

/** `flagProvider`: any OpenFeature server provider, loaded with `await import()` (SPEC §16). */
export interface FlagProviderConfig {
  /** What `import()` is given: a package name, or the file URL of a module path. */
  module: string
  /** The provider class among the module's exports. */
  export: string
  options: Readonly<Record<string, unknown>>
  /** Re-read the provider's flags this often, as well as on its events; null = on events only. */
  pollMs: number | null
}

export interface RollbackCommon {
  timeoutMs: number
  /** At most one rollback per cooldown. */
  cooldownMs: number
  /** Automatic rollbacks only within this time of a version or config change; 0 = no such rule. */
  requireRecentChangeMs: number
}

export type RollbackConfig =
  | (RollbackCommon & { type: 'webhook', url: string, headers: Readonly<Record<string, string>>, retries: number })
  | (RollbackCommon & { type: 'exec', command: readonly string[] })
  /** GitOps (SPEC §19): revert the newest commit touching `path` on `branch` and push it. */
  | (RollbackCommon & { type: 'git', repo: string, branch: string, path: string | null, author: string | null })

export interface TriggerConfig {
  name: string
  metric: 'error_rate' | 'p99_latency'
  /** A ratio (0–1) for error_rate, milliseconds for p99_latency. */
  threshold: number
  windowMs: number
  action: 'rollback' | 'killSwitch' | 'circuitBreak' | 'notify'
  minRequests: number
  /** How long the condition must hold before firing. */
  forMs: number
  route: string | null
  upstream: string | null
  flags: readonly string[] | null
  upstreams: readonly string[] | null
}

export interface NotificationsConfig {
  slackChannel: string | null
  slackWebhookUrl: string | null
  pagerDutyServiceId: string | null
  pagerDutyRoutingKey: string | null
  /** Where escalations go (PagerDuty `critical`); the routing key when null. */
  pagerDutyEscalationRoutingKey: string | null
  /** An incident not verified restored within this long is escalated once (SPEC §19). */
  escalateAfterMs: number
  pagerDutyUrl: string
  statusPageId: string | null
  statusPageApiKey: string | null
  statusPageUrl: string
  webhooks: readonly string[]
  queueSize: number
  maxAttempts: number
  alertmanager: AlertmanagerConfig | null
}

export interface AlertmanagerConfig {
  urls: readonly string[]
  /** Extra labels on every alert. */
  labels: Readonly<Record<string, string>>
  /** How often a firing alert is posted again (under Alertmanager's resolve_timeout). */
  repeatIntervalMs: number
}

/** SPEC §16: fleet state and coordination in etcd; null = this sidecar decides alone. */
export interface FleetConfig {
  etcd: {
    endpoints: readonly string[]
    /** Key prefix, no trailing slash: `/breakwater`. */
    prefix: string
    username: string | null
    password: string | null
    /** Absolute paths of PEM files. */
    tls: { ca: string | null, cert: string | null, key: string | null } | null
    /** Their content as the config check read and checked it: the etcd client uses this, never a second read. */
    tlsPem: { ca: string | null, cert: string | null, key: string | null } | null
  }
  leaseTtlMs: number
}

export interface SyntheticConfig {
  /** The route it checks (the route its path matches, when not given). */
  route: string | null
  method: string
  path: string
  host: string | null
  expectStatus: number
}

export interface VerificationConfig {
  synthetics: readonly SyntheticConfig[]
  intervalMs: number
  /** Consecutive passing synthetic rounds needed. */
  successes: number
  /** Real traffic is judged over the last windowMs since the mitigation. */
  windowMs: number
  /** Give up (not restored) after this long. */
  timeoutMs: number
  /** Error rate real traffic must be under when no trigger gives a threshold. */
  maxErrorRate: number
  /** The client certificate synthetics present to a mutual-TLS proxy listener; null: the listener's own. */
  clientCert: { cert: string, key: string } | null
}

/** `tracing`: OpenTelemetry spans exported over OTLP/HTTP (SPEC §18). */
export interface TracingConfig {
  /** The full URL spans are POSTed to (…/v1/traces). */
  otlpEndpoint: string
  sampleRatio: number
  serviceName: string
  /** OTLP/HTTP encoding of the export requests. */
  protocol: 'http/protobuf' | 'http/json'
  headers: Readonly<Record<string, string>>
  /**
   * The CA bundle an https:// collector is verified against (null: the system's roots): its
   * path, and its PEM as the config check read and checked it — the exporter uses that very
   * content, never a second read that could find the file changed, cut or gone.
   */
  tls: { ca: string | null, caPem: string | null }
  maxQueueSize: number
  batch: { maxSize: number, delayMs: number, timeoutMs: number }
}

export type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent'

export interface Config {
  /** Absolute path of the file it was read from, or null when built in code. */
  source: string | null
  service: string
  version: string
  stateDir: string
  listen: {
    proxy: ProxyListenerConfig
    egress: ProxyListenerConfig | null
    ops: ListenerConfig
    admin: ListenerConfig
  }
  upstreams: Readonly<Record<string, UpstreamConfig>>
  routes: readonly RouteConfig[]
  featureFlags: Readonly<Record<string, boolean>>
  flagSource: FlagSourceConfig | null
  flagProvider: FlagProviderConfig | null
  /** Header whose value is the flagd `targetingKey` of a request (lower case). */
  flags: { targetingKeyHeader: string }
  /** Keyed by upstream name; only these upstreams have a breaker (SPEC §14). */
  circuitBreakers: Readonly<Record<string, CircuitBreakerConfig>>
  rollbackTriggers: readonly TriggerConfig[]
  verification: VerificationConfig
  notifications: NotificationsConfig
  fleet: FleetConfig | null
  admin: { tokenFile: string | null }
  rollback: RollbackConfig | null
  health: { failOnOpenCircuit: 'critical' | 'any' | 'never' }
  shutdown: { drainDelayMs: number, timeoutMs: number }
  logging: { level: LogLevel, accessLogRate: number }
  limits: { maxInFlight: number, maxConnections: number, maxEventLoopDelayMs: number }
  /** Null when not configured: nothing of OpenTelemetry is loaded. */
  tracing: TracingConfig | null
}
