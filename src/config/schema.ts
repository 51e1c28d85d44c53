/**
 * The configuration schema. The TypeBox schema *is* the type: `ConfigInput` is what a user
 * writes, `config/breakwater.schema.json` is generated from it (a test fails if it drifts),
 * and `load.ts` turns a validated input into the frozen `Config` the rest of Breakwater reads.
 *
 * Every object is closed (`additionalProperties: false`): a misspelt key is an error, never
 * silently ignored.
 */
import { Type, type Static, type TSchema, type TProperties, type ObjectOptions } from '@sinclair/typebox'

const closed = <T extends TProperties>(properties: T, options: ObjectOptions = {}) =>
  Type.Object(properties, { additionalProperties: false, ...options })

/** `500ms`, `30s`, `5m`, `1h`, or a number of milliseconds. */
export const Duration = Type.Union(
  [
    Type.Integer({ minimum: 0 }),
    Type.String({ pattern: '^[0-9]+(\\.[0-9]+)?(ms|s|m|h)$', description: 'a duration: 500ms, 30s, 5m, 1h' })
  ],
  { description: 'milliseconds, or a string such as 500ms, 30s, 5m, 1h' }
)

/** Names of upstreams and routes become metric labels: keep them tame. */
const NAME_PATTERN = '^[A-Za-z_][A-Za-z0-9_.-]{0,63}$'
const Name = Type.String({ pattern: NAME_PATTERN })

const Port = Type.Integer({ minimum: 0, maximum: 65535 })
const Host = Type.String({ minLength: 1 })

const HttpUrl = Type.String({ pattern: '^https?://[^\\s/?#]+(/[^\\s?#]*)?$', description: 'an http:// or https:// origin' })

const WebhookUrl = Type.String({ pattern: '^https?://[^\\s/?#]+[^\\s]*$', description: 'an http:// or https:// URL' })

const ProxyListener = closed({
  host: Type.Optional(Host),
  port: Type.Optional(Port),
  keepAliveTimeoutMs: Type.Optional(Duration),
  requestTimeoutMs: Type.Optional(Duration),
  headersTimeoutMs: Type.Optional(Duration),
  maxHeaderSize: Type.Optional(Type.Integer({ minimum: 1024, maximum: 1048576 }))
})

const PlainListener = closed({
  host: Type.Optional(Host),
  port: Type.Optional(Port)
})

const HealthCheck = closed({
  path: Type.String({ pattern: '^/' }),
  intervalMs: Type.Optional(Duration),
  timeoutMs: Type.Optional(Duration),
  unhealthyThreshold: Type.Optional(Type.Integer({ minimum: 1 })),
  healthyThreshold: Type.Optional(Type.Integer({ minimum: 1 }))
})

const Upstream = closed({
  url: Type.Optional(HttpUrl),
  endpoints: Type.Optional(Type.Array(HttpUrl, { minItems: 1 })),
  critical: Type.Optional(Type.Boolean()),
  healthCheck: Type.Optional(HealthCheck),
  connectTimeoutMs: Type.Optional(Duration),
  keepAliveTimeoutMs: Type.Optional(Duration),
  connections: Type.Optional(Type.Integer({ minimum: 1, maximum: 65536 })),
  balance: Type.Optional(Type.Union([Type.Literal('round_robin'), Type.Literal('least_request')])),
  ejection: Type.Optional(closed({
    consecutiveFailures: Type.Optional(Type.Integer({ minimum: 1 })),
    baseMs: Type.Optional(Duration),
    maxMs: Type.Optional(Duration),
    panicThresholdPercent: Type.Optional(Type.Number({ minimum: 0, maximum: 100 }))
  }))
})

const HeaderName = '^[A-Za-z0-9!#$%&\'*+.^_`|~-]+$'

const Match = closed({
  pathPrefix: Type.Optional(Type.String({ pattern: '^/' })),
  path: Type.Optional(Type.String({ pattern: '^/' })),
  methods: Type.Optional(Type.Array(Type.String({ pattern: '^[A-Za-z]+$' }), { minItems: 1 })),
  host: Type.Optional(Type.String({ minLength: 1 })),
  headers: Type.Optional(Type.Record(Type.String({ pattern: HeaderName }), Type.String())),
  strict: Type.Optional(Type.Boolean({ description: 'match the path exactly as spelled (default false: case, ;parameters and one trailing slash are ignored)' }))
})

const Retries = closed({
  attempts: Type.Integer({ minimum: 1, maximum: 10 }),
  budgetPercent: Type.Optional(Type.Number({ minimum: 0, maximum: 100 })),
  minRetriesPerSecond: Type.Optional(Type.Number({ minimum: 0 }))
})

const FlagKey = Type.String({ pattern: '^[A-Za-z0-9_.:-]{1,128}$' })

const CircuitBreaker = closed({
  failureThreshold: Type.Optional(Type.Number({ minimum: 0, maximum: 1 })),
  volumeThreshold: Type.Optional(Type.Integer({ minimum: 1 })),
  rollingWindowMs: Type.Optional(Duration),
  recoveryTimeout: Type.Optional(Duration),
  maxConcurrentRequests: Type.Optional(Type.Integer({ minimum: 1 })),
  failureStatuses: Type.Optional(Type.Array(Type.Integer({ minimum: 100, maximum: 599 }), { minItems: 1 }))
})

const Route = closed({
  name: Type.Optional(Name),
  match: Match,
  upstream: Name,
  listener: Type.Optional(Type.Union([Type.Literal('proxy'), Type.Literal('egress')], { description: 'the listener whose requests reach this route (default proxy)' })),
  killSwitch: Type.Optional(FlagKey),
  timeoutMs: Type.Optional(Duration),
  idleTimeoutMs: Type.Optional(Duration),
  retries: Type.Optional(Retries),
  rewritePrefix: Type.Optional(Type.String({ pattern: '^/' })),
  fault: Type.Optional(closed({
    abortPercent: Type.Optional(Type.Number({ minimum: 0, maximum: 100 })),
    abortStatus: Type.Optional(Type.Integer({ minimum: 200, maximum: 599 })),
    delayPercent: Type.Optional(Type.Number({ minimum: 0, maximum: 100 })),
    delayMs: Type.Optional(Duration),
    flag: Type.Optional(FlagKey)
  }))
})

export const ConfigSchema = closed(
  {
    $schema: Type.Optional(Type.String()),
    service: Type.String({ minLength: 1, pattern: '^[^\\s]+$' }),
    version: Type.Optional(Type.String({ minLength: 1 })),
    stateDir: Type.Optional(Type.String({ minLength: 1 })),
    listen: Type.Optional(closed({
      proxy: Type.Optional(ProxyListener),
      egress: Type.Optional(ProxyListener),
      ops: Type.Optional(PlainListener),
      admin: Type.Optional(PlainListener)
    })),
    upstreams: Type.Record(Type.String({ pattern: NAME_PATTERN }), Upstream, { minProperties: 1 }),
    routes: Type.Array(Route, { minItems: 1 }),
    featureFlags: Type.Optional(Type.Record(FlagKey, Type.Boolean())),
    flagSource: Type.Optional(closed({
      type: Type.Literal('flagd-file'),
      path: Type.String({ minLength: 1 }),
      pollIntervalMs: Type.Optional(Duration)
    })),
    circuitBreakers: Type.Optional(Type.Record(Type.String({ pattern: NAME_PATTERN }), CircuitBreaker)),
    rollbackTriggers: Type.Optional(Type.Array(closed({
      name: Type.Optional(Name),
      metric: Type.Union([Type.Literal('error_rate'), Type.Literal('p99_latency')]),
      threshold: Type.Number({ minimum: 0 }),
      window: Duration,
      action: Type.Union([Type.Literal('rollback'), Type.Literal('killSwitch'), Type.Literal('circuitBreak'), Type.Literal('notify')]),
      minRequests: Type.Optional(Type.Integer({ minimum: 1 })),
      for: Type.Optional(Duration),
      route: Type.Optional(Name),
      upstream: Type.Optional(Name),
      flags: Type.Optional(Type.Array(FlagKey, { minItems: 1 })),
      upstreams: Type.Optional(Type.Array(Name, { minItems: 1 }))
    }))),
    notifications: Type.Optional(closed({
      slackChannel: Type.Optional(Type.String({ minLength: 1 })),
      slackWebhookUrl: Type.Optional(WebhookUrl),
      pagerDutyServiceId: Type.Optional(Type.String({ minLength: 1 })),
      pagerDutyRoutingKey: Type.Optional(Type.String({ minLength: 1 })),
      pagerDutyUrl: Type.Optional(WebhookUrl),
      statusPageId: Type.Optional(Type.String({ minLength: 1 })),
      statusPageApiKey: Type.Optional(Type.String({ minLength: 1 })),
      statusPageUrl: Type.Optional(WebhookUrl),
      webhooks: Type.Optional(Type.Array(WebhookUrl)),
      queueSize: Type.Optional(Type.Integer({ minimum: 1, maximum: 100000 })),
      maxAttempts: Type.Optional(Type.Integer({ minimum: 1, maximum: 20 })),
      alertmanager: Type.Optional(closed({
        urls: Type.Array(WebhookUrl, { minItems: 1 }),
        labels: Type.Optional(Type.Record(Type.String({ pattern: '^[a-zA-Z_][a-zA-Z0-9_]*$' }), Type.String())),
        repeatInterval: Type.Optional(Duration)
      }))
    })),
    fleet: Type.Optional(closed({
      etcd: closed({
        endpoints: Type.Array(WebhookUrl, { minItems: 1 }),
        prefix: Type.Optional(Type.String({ pattern: '^/[^\\s]*[^/\\s]$' })),
        username: Type.Optional(Type.String({ minLength: 1 })),
        password: Type.Optional(Type.String()),
        tls: Type.Optional(closed({
          ca: Type.Optional(Type.String({ minLength: 1 })),
          cert: Type.Optional(Type.String({ minLength: 1 })),
          key: Type.Optional(Type.String({ minLength: 1 }))
        }))
      }),
      leaseTtl: Type.Optional(Duration)
    })),
    verification: Type.Optional(closed({
      synthetics: Type.Optional(Type.Array(closed({
        route: Type.Optional(Name),
        method: Type.Optional(Type.String({ pattern: '^[A-Z]+$' })),
        path: Type.String({ pattern: '^/' }),
        host: Type.Optional(Type.String({ minLength: 1 })),
        expectStatus: Type.Optional(Type.Integer({ minimum: 100, maximum: 599 }))
      }))),
      intervalMs: Type.Optional(Duration),
      successes: Type.Optional(Type.Integer({ minimum: 1, maximum: 100 })),
      windowMs: Type.Optional(Duration),
      timeoutMs: Type.Optional(Duration),
      maxErrorRate: Type.Optional(Type.Number({ minimum: 0, maximum: 1 }))
    })),
    admin: Type.Optional(closed({
      tokenFile: Type.Optional(Type.String({ minLength: 1 }))
    })),
    rollback: Type.Optional(Type.Union([
      closed({
        type: Type.Literal('webhook'),
        url: WebhookUrl,
        headers: Type.Optional(Type.Record(Type.String({ pattern: HeaderName }), Type.String())),
        timeoutMs: Type.Optional(Duration),
        retries: Type.Optional(Type.Integer({ minimum: 0, maximum: 10 })),
        cooldown: Type.Optional(Duration),
        requireRecentChange: Type.Optional(Type.Union([Duration, Type.Literal(false)]))
      }),
      closed({
        type: Type.Literal('exec'),
        command: Type.Array(Type.String({ minLength: 1 }), { minItems: 1 }),
        timeoutMs: Type.Optional(Duration),
        cooldown: Type.Optional(Duration),
        requireRecentChange: Type.Optional(Type.Union([Duration, Type.Literal(false)]))
      })
    ], { description: 'a rollback action: {type: webhook, url} or {type: exec, command: [argv]}' })),
    health: Type.Optional(closed({
      failOnOpenCircuit: Type.Optional(Type.Union([Type.Literal('critical'), Type.Literal('any'), Type.Literal('never')]))
    })),
    shutdown: Type.Optional(closed({
      drainDelayMs: Type.Optional(Duration),
      timeoutMs: Type.Optional(Duration)
    })),
    logging: Type.Optional(closed({
      level: Type.Optional(Type.Union(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((l) => Type.Literal(l)))),
      accessLog: Type.Optional(Type.Union([Type.Boolean(), Type.Number({ minimum: 0, maximum: 1 })]))
    })),
    limits: Type.Optional(closed({
      maxInFlight: Type.Optional(Type.Integer({ minimum: 1 })),
      maxConnections: Type.Optional(Type.Integer({ minimum: 1 })),
      maxEventLoopDelayMs: Type.Optional(Duration)
    }))
  },
  {
    $id: 'https://breakwater.dev/schema/breakwater.schema.json',
    title: 'Breakwater configuration',
    description: 'Configuration of the Breakwater sidecar proxy'
  }
)

/** What a user writes (YAML, JSON or an `.mjs` module exporting it). */
export type ConfigInput = Static<typeof ConfigSchema>

export type { TSchema }
