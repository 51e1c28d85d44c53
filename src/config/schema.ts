/**
 * The configuration schema. The TypeBox schema *is* the type: `ConfigInput` is what a user
 * writes, `config/breakwater.schema.json` is generated from it (a test fails if it drifts),
 * and `load.ts` turns a validated input into the frozen `Config` the rest of Breakwater reads.
 *
 * Every object is closed (`additionalProperties: false`): a misspelt key is an error, never
 * silently ignored. Every default is declared here, once, with `withDefault`: editors see it in
 * the JSON schema, the loader fills it in, and `Resolved` types the key as present. A key that
 * means "off" when absent (`healthCheck`, `retries`, `maxConcurrentRequests`, …) has none, nor
 * does one derived from another key (`rateLimit.burst`, `tracing.batch.maxSize`): its
 * description says how. A key that only makes sense beside another names it in the object's
 * `dependencies` (JSON Schema's keyword; editors show it, the loader checks it).
 */
import { Type, CloneType, type Static, type TSchema, type TProperties, type ObjectOptions, type TObject, type TRecord, type TArray, type TUnion, type TOptional } from '@sinclair/typebox'
import { DURATION_KIND, MAX_DURATION_MS } from './duration.js'
import { DEFAULT_ADMIN_LISTEN, DEFAULT_OPS_LISTEN, DEFAULT_STATE_DIR } from './defaults.js'

const closed = <T extends TProperties>(properties: T, options: ObjectOptions = {}) =>
  Type.Object(properties, { additionalProperties: false, ...options })

/** An optional key and the value it takes when absent. */
export type TDefault<T extends TSchema> = TOptional<T & { default: Static<T> }>

/** `schema` as an optional key that takes `value` when absent (the JSON schema's `default`). */
const withDefault = <T extends TSchema>(schema: T, value: Static<T>): TDefault<T> =>
  Type.Optional(CloneType(schema, { default: value })) as TDefault<T>

/** A section whose keys all have defaults: absent, it is `{}` with every default filled in. */
const section = <T extends TProperties>(properties: T) => withDefault(closed(properties), {} as Static<TObject<T>>)

/** `500ms`, `30s`, `5m`, `1h`, or a number of milliseconds; at most `MAX_DURATION_MS` either way. */
export const Duration = Type.Union(
  [
    Type.Integer({ minimum: 0, maximum: MAX_DURATION_MS }),
    Type.String({ pattern: '^[0-9]+(\\.[0-9]+)?(ms|s|m|h)$', description: 'a duration: 500ms, 30s, 5m, 1h' })
  ],
  { description: `milliseconds, or a string such as 500ms, 30s, 5m, 1h; at most ${MAX_DURATION_MS} ms (about 24.8 days)`, [DURATION_KIND]: true }
)

/** Names of upstreams and routes become metric labels: keep them tame. */
const NAME_PATTERN = '^[A-Za-z_][A-Za-z0-9_.-]{0,63}$'
const Name = Type.String({ pattern: NAME_PATTERN })

const Port = Type.Integer({ minimum: 0, maximum: 65535 })
const Host = Type.String({ minLength: 1 })

const HttpUrl = Type.String({ pattern: '^https?://[^\\s/?#]+(/[^\\s?#]*)?$', description: 'an http:// or https:// origin' })

const WebhookUrl = Type.String({ pattern: '^https?://[^\\s/?#]+[^\\s]*$', description: 'an http:// or https:// URL' })

const PemFile = (what: string) => Type.String({ minLength: 1, description: `path to a PEM file: ${what} (relative to the config file)` })

/** A listener's TLS (SPEC §18): the files are re-read when they change. */
const ListenerTls = closed({
  cert: PemFile('the certificate (chain)'),
  key: PemFile('its private key'),
  ca: Type.Optional(PemFile('CA certificates that client certificates are verified against')),
  requestClientCert: withDefault(Type.Boolean({ description: 'mutual TLS: require a client certificate signed by ca' }), false)
})

/** An `https://` upstream's TLS (SPEC §18). */
const UpstreamTls = closed({
  ca: Type.Optional(PemFile('CA certificates the upstream\'s certificate is verified against (default: the system\'s)')),
  cert: Type.Optional(PemFile('the client certificate presented to the upstream (mutual TLS)')),
  key: Type.Optional(PemFile('the client certificate\'s private key')),
  servername: Type.Optional(Type.String({ minLength: 1, description: 'SNI and the name the certificate is checked against (default: the endpoint\'s host)' })),
  rejectUnauthorized: withDefault(Type.Boolean({ description: 'refuse an upstream whose certificate does not verify' }), true)
})

/** A data-plane listener (`listen.proxy`, `listen.egress`), on `port` unless configured. */
const proxyListener = (port: number) => closed({
  host: withDefault(Host, '0.0.0.0'),
  port: withDefault(Port, port),
  keepAliveTimeoutMs: withDefault(Duration, 75_000),
  requestTimeoutMs: withDefault(Duration, 0),
  headersTimeoutMs: withDefault(Duration, 60_000),
  maxHeaderSize: withDefault(Type.Integer({ minimum: 1024, maximum: 1048576 }), 16_384),
  maxHeadersCount: withDefault(Type.Integer({ minimum: 1, maximum: 10000, description: 'more request header fields than this is 431' }), 100),
  trustedProxies: withDefault(Type.Array(Type.String({ minLength: 1 }), { description: 'addresses or CIDRs of proxies whose x-forwarded-for entries are believed' }), []),
  acceptors: withDefault(Type.Integer({ minimum: 1, maximum: 64, description: 'listening sockets sharing the port (SO_REUSEPORT; Linux with Node >= 22.12, one elsewhere): each accepts one new connection per event-loop turn' }), 4),
  tls: Type.Optional(ListenerTls)
})

const plainListener = (host: string, port: number) => section({
  host: withDefault(Host, host),
  port: withDefault(Port, port)
})

const HealthCheck = closed({
  path: Type.String({ pattern: '^/' }),
  intervalMs: withDefault(Duration, 5000),
  // Default: 2000 ms, or intervalMs when that is shorter (build.ts): a short interval alone is valid.
  timeoutMs: Type.Optional(Duration),
  unhealthyThreshold: withDefault(Type.Integer({ minimum: 1 }), 3),
  healthyThreshold: withDefault(Type.Integer({ minimum: 1 }), 2)
})

export const UpstreamSchema = closed({
  url: Type.Optional(HttpUrl),
  endpoints: Type.Optional(Type.Array(HttpUrl, { minItems: 1 })),
  critical: withDefault(Type.Boolean(), false),
  healthCheck: Type.Optional(HealthCheck),
  connectTimeoutMs: withDefault(Duration, 5000),
  keepAliveTimeoutMs: withDefault(Duration, 4000),
  connections: withDefault(Type.Integer({ minimum: 1, maximum: 65536 }), 128),
  balance: withDefault(Type.Union([Type.Literal('round_robin'), Type.Literal('least_request')]), 'round_robin'),
  ejection: section({
    consecutiveFailures: withDefault(Type.Integer({ minimum: 1 }), 7),
    baseMs: withDefault(Duration, 1000),
    maxMs: withDefault(Duration, 60_000),
    panicThresholdPercent: withDefault(Type.Number({ minimum: 0, maximum: 100 }), 50)
  }),
  failover: Type.Optional(Name),
  failbackAfter: withDefault(Duration, '30s'),
  tls: Type.Optional(UpstreamTls)
}, { dependencies: { failbackAfter: ['failover'] } })

const HeaderName = '^[A-Za-z0-9!#$%&\'*+.^_`|~-]+$'

const RateLimit = closed({
  requestsPerSecond: Type.Number({ exclusiveMinimum: 0 }),
  burst: Type.Optional(Type.Integer({ minimum: 1, description: 'tokens a bucket holds (default: requestsPerSecond rounded up, at least 1)' })),
  key: withDefault(Type.String({ pattern: '^(route|client|header:[A-Za-z0-9!#$%&\'*+.^_`|~-]+)$', description: 'route, client or header:NAME' }), 'route'),
  maxKeys: withDefault(Type.Integer({ minimum: 1, description: 'buckets kept at most; the least recently used is evicted' }), 100_000)
})

/** A fallback serves the last good response (`staleIfError`, kept in `cache`) or a static one (`status` and the keys that need it). */
const Fallback = closed({
  staleIfError: Type.Optional(Duration),
  cache: section({
    maxEntries: withDefault(Type.Integer({ minimum: 1 }), 1000),
    maxBytes: withDefault(Type.Integer({ minimum: 1024 }), 10 * 1024 * 1024),
    maxEntryBytes: withDefault(Type.Integer({ minimum: 1, description: 'a larger response is not stored (at most maxBytes is used)' }), 1024 * 1024)
  }),
  status: Type.Optional(Type.Integer({ minimum: 200, maximum: 599 })),
  body: Type.Optional(Type.String({ description: 'the static body (default: empty, or the file\'s contents)' })),
  file: Type.Optional(Type.String({ minLength: 1 })),
  contentType: Type.Optional(Type.String({ minLength: 1, description: 'default: text/plain; charset=utf-8 for a body, application/octet-stream for a file' })),
  headers: withDefault(Type.Record(Type.String({ pattern: HeaderName }), Type.String()), {})
}, { dependencies: { cache: ['staleIfError'], body: ['status'], file: ['status'], contentType: ['status'], headers: ['status'] } })

export const MatchSchema = closed({
  pathPrefix: Type.Optional(Type.String({ pattern: '^/' })),
  path: Type.Optional(Type.String({ pattern: '^/' })),
  methods: Type.Optional(Type.Array(Type.String({ pattern: '^[A-Za-z]+$' }), { minItems: 1 })),
  host: Type.Optional(Type.String({ minLength: 1 })),
  headers: Type.Optional(Type.Record(Type.String({ pattern: HeaderName }), Type.String())),
  strict: withDefault(Type.Boolean({ description: 'match the path exactly as spelled (default false: case, ;parameters and one trailing slash are ignored)' }), false)
})

const Retries = closed({
  attempts: Type.Integer({ minimum: 1, maximum: 10 }),
  budgetPercent: withDefault(Type.Number({ minimum: 0, maximum: 100 }), 20),
  minRetriesPerSecond: withDefault(Type.Number({ minimum: 0 }), 10)
})

const FlagKey = Type.String({ pattern: '^[A-Za-z0-9_.:-]{1,128}$' })

export const CircuitBreakerSchema = closed({
  failureThreshold: withDefault(Type.Number({ minimum: 0, maximum: 1 }), 0.5),
  volumeThreshold: withDefault(Type.Integer({ minimum: 1 }), 20),
  rollingWindowMs: withDefault(Duration, 10_000),
  recoveryTimeout: withDefault(Duration, 30_000),
  maxConcurrentRequests: Type.Optional(Type.Integer({ minimum: 1, description: 'the bulkhead: requests in flight to the upstream at most (absent: unlimited)' })),
  failureStatuses: withDefault(Type.Array(Type.Integer({ minimum: 100, maximum: 599 }), { minItems: 1 }), [500, 502, 503, 504])
})

export const RouteSchema = closed({
  name: Type.Optional(Name),
  match: MatchSchema,
  upstream: Name,
  listener: withDefault(Type.Union([Type.Literal('proxy'), Type.Literal('egress')], { description: 'the listener whose requests reach this route' }), 'proxy'),
  killSwitch: Type.Optional(FlagKey),
  timeoutMs: withDefault(Duration, 15_000),
  idleTimeoutMs: withDefault(Duration, 60_000),
  retries: Type.Optional(Retries),
  rewritePrefix: Type.Optional(Type.String({ pattern: '^/' })),
  fault: Type.Optional(closed({
    abortPercent: withDefault(Type.Number({ minimum: 0, maximum: 100 }), 0),
    abortStatus: withDefault(Type.Integer({ minimum: 200, maximum: 599 }), 503),
    delayPercent: withDefault(Type.Number({ minimum: 0, maximum: 100 }), 0),
    delayMs: withDefault(Duration, 0),
    flag: Type.Optional(FlagKey)
  })),
  rateLimit: Type.Optional(RateLimit),
  fallback: Type.Optional(Fallback)
})

export const TriggerSchema = closed({
  name: Type.Optional(Name),
  metric: Type.Union([Type.Literal('error_rate'), Type.Literal('p99_latency')]),
  threshold: Type.Number({ minimum: 0 }),
  window: Duration,
  action: Type.Union([Type.Literal('rollback'), Type.Literal('killSwitch'), Type.Literal('circuitBreak'), Type.Literal('notify')]),
  minRequests: withDefault(Type.Integer({ minimum: 1 }), 20),
  for: withDefault(Duration, 0),
  route: Type.Optional(Name),
  upstream: Type.Optional(Name),
  flags: Type.Optional(Type.Array(FlagKey, { minItems: 1 })),
  upstreams: Type.Optional(Type.Array(Name, { minItems: 1 }))
})

/** Settings every rollback action has. */
const rollbackCommon = {
  cooldown: withDefault(Duration, '10m'),
  requireRecentChange: withDefault(Type.Union([Duration, Type.Literal(false)]), '30m')
}

export const RollbackSchema = Type.Union([
  closed({
    type: Type.Literal('webhook'),
    url: WebhookUrl,
    headers: withDefault(Type.Record(Type.String({ pattern: HeaderName }), Type.String()), {}),
    timeoutMs: withDefault(Duration, 10_000),
    retries: withDefault(Type.Integer({ minimum: 0, maximum: 10 }), 3),
    ...rollbackCommon
  }),
  closed({
    type: Type.Literal('exec'),
    command: Type.Array(Type.String({ minLength: 1 }), { minItems: 1 }),
    timeoutMs: withDefault(Duration, 60_000),
    ...rollbackCommon
  }),
  closed({
    type: Type.Literal('git'),
    repo: Type.String({ minLength: 1, description: 'remote URL or path of the repository the CD system deploys from' }),
    branch: Type.String({ minLength: 1, pattern: '^[^\\s~^:?*\\[\\\\]+$' }),
    path: Type.Optional(Type.String({ minLength: 1, description: 'only commits touching this path are reverted' })),
    author: Type.Optional(Type.String({ pattern: '^[^<>]+ <[^<>\\s]+>$', description: 'Name <email> of the revert commit' })),
    timeoutMs: withDefault(Duration, 120_000),
    ...rollbackCommon
  })
], { description: 'a rollback action: {type: webhook, url}, {type: exec, command: [argv]} or {type: git, repo, branch}' })

export const ConfigSchema = closed(
  {
    $schema: Type.Optional(Type.String()),
    service: Type.String({ minLength: 1, pattern: '^[^\\s]+$' }),
    version: withDefault(Type.String({ minLength: 1 }), 'dev'),
    stateDir: withDefault(Type.String({ minLength: 1 }), DEFAULT_STATE_DIR),
    listen: section({
      proxy: withDefault(proxyListener(14001), {}),
      egress: Type.Optional(proxyListener(14002)),
      ops: plainListener(DEFAULT_OPS_LISTEN.host, DEFAULT_OPS_LISTEN.port),
      admin: plainListener(DEFAULT_ADMIN_LISTEN.host, DEFAULT_ADMIN_LISTEN.port)
    }),
    upstreams: Type.Record(Type.String({ pattern: NAME_PATTERN }), UpstreamSchema, { minProperties: 1 }),
    routes: Type.Array(RouteSchema, { minItems: 1 }),
    featureFlags: withDefault(Type.Record(FlagKey, Type.Boolean()), {}),
    flagSource: Type.Optional(closed({
      type: Type.Literal('flagd-file'),
      path: Type.String({ minLength: 1 }),
      pollIntervalMs: withDefault(Duration, 250)
    })),
    tracing: Type.Optional(closed({
      otlpEndpoint: Type.String({ pattern: '^https?://[^\\s/?#]+[^\\s]*$', description: 'the collector\'s OTLP/HTTP URL: an origin (http://otel-collector:4318, /v1/traces is added) or the full traces URL' }),
      sampleRatio: Type.Number({ minimum: 0, maximum: 1, description: 'share of new traces sampled; a request that carries a traceparent follows its sampled flag' }),
      serviceName: Type.Optional(Type.String({ minLength: 1, description: 'service.name of the spans (default: service)' })),
      protocol: withDefault(Type.Union([Type.Literal('http/protobuf'), Type.Literal('http/json')], { description: 'OTLP/HTTP encoding: binary protobuf (OpenTelemetry\'s default, about a third of the CPU and half the bytes of JSON) or JSON' }), 'http/protobuf'),
      headers: withDefault(Type.Record(Type.String({ pattern: HeaderName }), Type.String(), { description: 'headers sent with every export (a collector\'s API key)' }), {}),
      tls: Type.Optional(closed({
        ca: PemFile('CA certificates an https:// collector\'s certificate is verified against (default: the system\'s)')
      })),
      maxQueueSize: withDefault(Type.Integer({ minimum: 1, maximum: 1000000, description: 'spans held for export; beyond it spans are dropped and counted' }), 2048),
      batch: section({
        maxSize: Type.Optional(Type.Integer({ minimum: 1, maximum: 100000, description: 'spans per export request (default: 512, at most maxQueueSize)' })),
        delayMs: withDefault(Duration, 1000),
        timeoutMs: withDefault(Duration, 10_000)
      })
    })),
    flagProvider: Type.Optional(closed({
      module: Type.String({ minLength: 1, description: 'a package name, or a path to an ES module (relative to the config file)' }),
      export: withDefault(Type.String({ minLength: 1, description: 'the provider class to construct' }), 'default'),
      options: withDefault(Type.Record(Type.String(), Type.Unknown(), { description: 'passed to the constructor: new Provider(options, logger)' }), {}),
      pollMs: Type.Optional(Duration)
    })),
    flags: section({
      targetingKeyHeader: withDefault(Type.String({ pattern: HeaderName, description: 'header whose value is the flagd targetingKey of a request' }), 'x-request-id')
    }),
    circuitBreakers: withDefault(Type.Record(Type.String({ pattern: NAME_PATTERN }), CircuitBreakerSchema), {}),
    rollbackTriggers: withDefault(Type.Array(TriggerSchema), []),
    notifications: section({
      slackChannel: Type.Optional(Type.String({ minLength: 1 })),
      slackWebhookUrl: Type.Optional(WebhookUrl),
      pagerDutyServiceId: Type.Optional(Type.String({ minLength: 1 })),
      pagerDutyRoutingKey: Type.Optional(Type.String({ minLength: 1 })),
      pagerDutyEscalationRoutingKey: Type.Optional(Type.String({ minLength: 1 })),
      escalateAfter: withDefault(Duration, 900_000),
      pagerDutyUrl: withDefault(WebhookUrl, 'https://events.pagerduty.com/v2/enqueue'),
      statusPageId: Type.Optional(Type.String({ minLength: 1 })),
      statusPageApiKey: Type.Optional(Type.String({ minLength: 1 })),
      statusPageUrl: withDefault(WebhookUrl, 'https://api.statuspage.io'),
      webhooks: withDefault(Type.Array(WebhookUrl), []),
      queueSize: withDefault(Type.Integer({ minimum: 1, maximum: 100000 }), 1000),
      maxAttempts: withDefault(Type.Integer({ minimum: 1, maximum: 20 }), 5),
      alertmanager: Type.Optional(closed({
        urls: Type.Array(WebhookUrl, { minItems: 1 }),
        labels: withDefault(Type.Record(Type.String({ pattern: '^[a-zA-Z_][a-zA-Z0-9_]*$' }), Type.String()), {}),
        repeatInterval: withDefault(Duration, '60s')
      }))
    }),
    fleet: Type.Optional(closed({
      etcd: closed({
        endpoints: Type.Array(WebhookUrl, { minItems: 1 }),
        prefix: withDefault(Type.String({ pattern: '^/[^\\s]*[^/\\s]$' }), '/breakwater'),
        username: Type.Optional(Type.String({ minLength: 1 })),
        password: Type.Optional(Type.String()),
        tls: Type.Optional(closed({
          ca: Type.Optional(Type.String({ minLength: 1 })),
          cert: Type.Optional(Type.String({ minLength: 1 })),
          key: Type.Optional(Type.String({ minLength: 1 }))
        }))
      }),
      leaseTtl: withDefault(Duration, '10s')
    })),
    verification: section({
      synthetics: withDefault(Type.Array(closed({
        route: Type.Optional(Name),
        method: withDefault(Type.String({ pattern: '^[A-Z]+$' }), 'GET'),
        path: Type.String({ pattern: '^/' }),
        host: Type.Optional(Type.String({ minLength: 1 })),
        expectStatus: withDefault(Type.Integer({ minimum: 100, maximum: 599 }), 200)
      })), []),
      intervalMs: withDefault(Duration, 1000),
      successes: withDefault(Type.Integer({ minimum: 1, maximum: 100 }), 3),
      windowMs: withDefault(Duration, 10_000),
      timeoutMs: withDefault(Duration, 300_000),
      maxErrorRate: withDefault(Type.Number({ minimum: 0, maximum: 1 }), 0.05),
      clientCert: Type.Optional(closed({
        cert: Type.String({ minLength: 1 }),
        key: Type.String({ minLength: 1 })
      }, { description: 'the client certificate synthetics present to a mutual-TLS proxy listener (default: the listener\'s own pair)' }))
    }),
    admin: section({
      tokenFile: Type.Optional(Type.String({ minLength: 1 }))
    }),
    rollback: Type.Optional(RollbackSchema),
    health: section({
      failOnOpenCircuit: withDefault(Type.Union([Type.Literal('critical'), Type.Literal('any'), Type.Literal('never')]), 'critical')
    }),
    shutdown: section({
      drainDelayMs: withDefault(Duration, 5000),
      timeoutMs: withDefault(Duration, 20_000)
    }),
    logging: section({
      level: withDefault(Type.Union(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((l) => Type.Literal(l))), 'info'),
      accessLog: withDefault(Type.Union([Type.Boolean(), Type.Number({ minimum: 0, maximum: 1 })]), true)
    }),
    limits: section({
      maxInFlight: Type.Optional(Type.Integer({ minimum: 1, description: 'requests in flight on the data plane at most (absent: unlimited)' })),
      maxConnections: Type.Optional(Type.Integer({ minimum: 1, description: 'client connections at most (absent: unlimited)' })),
      maxEventLoopDelayMs: withDefault(Duration, 1000)
    })
  },
  {
    $id: 'https://breakwater.dev/schema/breakwater.schema.json',
    title: 'Breakwater configuration',
    description: 'Configuration of the Breakwater sidecar proxy'
  }
)

/** What a user writes (YAML, JSON or an `.mjs` module exporting it). */
export type ConfigInput = Static<typeof ConfigSchema>

/**
 * A validated input once the loader filled in the defaults: a key declared `withDefault` is
 * present, every other optional key may still be absent (absent means "off" or "none").
 */
export type Resolved<S> =
  S extends TObject<infer P> ? ResolvedObject<P>
    : S extends TRecord<TSchema, infer V> ? Record<string, Resolved<V>>
      : S extends TArray<infer I> ? Array<Resolved<I>>
        : S extends TUnion<infer M> ? Resolved<M[number]>
          : S extends TSchema ? Static<S> : never

/** Keys present after defaults: the required ones and those declared `withDefault`. */
type PresentKeys<P extends TProperties> = { [K in keyof P]: P[K] extends TOptional<TSchema> ? (P[K] extends { default: unknown } ? K : never) : K }[keyof P]
type ResolvedObject<P extends TProperties> = { [K in PresentKeys<P>]: Resolved<P[K]> } & { [K in Exclude<keyof P, PresentKeys<P>>]?: Resolved<P[K]> }

export type ResolvedInput = Resolved<typeof ConfigSchema>

export type { TSchema }
