import t from 'tap'
import { ROOT } from './helpers/root.js'
import { readFileSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { pathToFileURL } from 'node:url'
import { loadConfigFile, resolveConfig, ConfigError } from '../src/config/load.js'
import { schemaJson } from '../src/config/generate-schema.js'
import { toMs, durationMs } from '../src/config/duration.js'
import type { Config } from '../src/config/types.js'
import type { Test } from 'tap'
import { tempDir } from './helpers/process.js'

const root = ROOT

/** The example of SPEC §2, without the sections that are not implemented yet (rollback triggers, notifications). */
const SPEC_EXAMPLE = `
service: checkout              # names this sidecar's service in metrics, logs, notifications
version: \${APP_VERSION:-dev}   # the deployed version; rollbacks and triage use it
stateDir: ./.breakwater        # overrides, audit log, admin token (created if missing)
listen:
  proxy: { host: 0.0.0.0, port: 14001 }   # data plane
  ops:   { host: 0.0.0.0, port: 14020 }   # /health /ready /live /metrics, read-only
  admin: { host: 127.0.0.1, port: 14000 } # mutating API, bearer token
upstreams:
  app:            { url: http://127.0.0.1:3000, critical: true,
                    healthCheck: { path: /healthz, intervalMs: 5000 } }
  paymentService: { endpoints: [http://10.0.0.5:8080, http://10.0.0.6:8080] }
routes:                        # first match wins
  - match: { pathPrefix: /checkout, methods: [GET, POST] }
    upstream: app
    killSwitch: enableNewCheckout     # flag key: false => route is blocked
    timeoutMs: 5000
  - match: { pathPrefix: /payments, host: payments.local }
    upstream: paymentService
    retries: { attempts: 2 }          # idempotent methods only, within a retry budget
  - match: { pathPrefix: / }
    upstream: app
featureFlags:                  # true = feature on; false = killed
  enableNewCheckout: true
flagSource: { type: flagd-file, path: ./flags.json }  # optional, hot-reloaded
circuitBreakers:               # keyed by upstream name
  paymentService: { failureThreshold: 0.5, recoveryTimeout: 30000, maxConcurrentRequests: 100 }
rollback: { type: webhook, url: https://cd.example/rollback }   # or { type: exec, command: [...] }
`

/** A small valid config input, with `extra` merged over it. */
function minimal (extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    service: 'shop',
    upstreams: { app: { url: 'http://127.0.0.1:3000' } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }],
    ...extra
  }
}

/** The problems `resolveConfig` reports for `raw` (fails the test when it accepts it). */
function problemsOf (t: Test, raw: unknown, env: NodeJS.ProcessEnv = {}): string[] {
  try {
    resolveConfig(raw, { env })
  } catch (err) {
    t.type(err, ConfigError, 'a ConfigError')
    return [...(err as ConfigError).problems]
  }
  t.fail('the configuration was accepted')
  return []
}

function resolved (raw: unknown, env: NodeJS.ProcessEnv = {}): Config {
  return resolveConfig(raw, { env }).config
}

/** Assert some problem line starts with `key: ` (and matches `pattern` when given). */
function reports (t: Test, problems: string[], key: string, pattern?: RegExp): void {
  const lines = problems.filter((p) => p.startsWith(`${key}: `))
  const ok = lines.length > 0 && (pattern === undefined || lines.some((l) => pattern.test(l)))
  t.ok(ok, `reports ${key}${pattern === undefined ? '' : ` ${String(pattern)}`}`, { problems })
}

t.test('the SPEC §2 example validates and resolves', async (t) => {
  const dir = tempDir(t)
  const path = join(dir, 'breakwater.yaml')
  writeFileSync(path, SPEC_EXAMPLE)
  const { config, warnings } = await loadConfigFile(path, {})
  t.ok(warnings.some((w) => w.startsWith('flagSource.path: ')), 'a flag file that does not exist yet is a warning, not an error', { warnings })
  t.equal(config.service, 'checkout')
  t.equal(config.version, 'dev', '${APP_VERSION:-dev} falls back to its default')
  t.equal(config.source, path)
  t.equal(config.stateDir, join(dir, '.breakwater'), 'a relative stateDir resolves against the config file\'s folder')
  t.same(config.listen.proxy.port, 14001)
  t.same(config.upstreams.app?.endpoints, ['http://127.0.0.1:3000'])
  t.equal(config.upstreams.app?.critical, true)
  t.equal(config.upstreams.app?.healthCheck?.path, '/healthz')
  t.equal(config.upstreams.app?.healthCheck?.intervalMs, 5000)
  t.same(config.upstreams.paymentService?.endpoints, ['http://10.0.0.5:8080', 'http://10.0.0.6:8080'])
  t.equal(config.routes.length, 3)
  t.same(config.routes[0]?.match.methods, ['GET', 'POST'])
  t.equal(config.routes[0]?.timeoutMs, 5000)
  t.equal(config.routes[1]?.match.host, 'payments.local')
  t.equal(config.routes[1]?.retries?.attempts, 2)
  t.equal(config.routes[1]?.retries?.budgetPercent, 20, 'retry budget default')
  t.equal(config.routes[0]?.killSwitch, 'enableNewCheckout')
  t.same(config.featureFlags, { enableNewCheckout: true })
  t.equal(config.flagSource?.path, join(dir, 'flags.json'), 'a relative flag file path resolves against the config file\'s folder')
  t.same(config.circuitBreakers.paymentService, {
    failureThreshold: 0.5, volumeThreshold: 20, rollingWindowMs: 10000, recoveryTimeout: 30000, maxConcurrentRequests: 100, failureStatuses: [500, 502, 503, 504]
  }, 'circuit breaker with its defaults')
  t.notOk('app' in config.circuitBreakers, 'no breaker for an upstream not listed')
  t.equal(config.rollback?.type, 'webhook')
  t.equal(config.rollback?.type === 'webhook' ? config.rollback.url : null, 'https://cd.example/rollback')
  t.equal(config.rollback?.cooldownMs, 600_000, 'rollback cooldown defaults to 10m')
  const names = config.routes.map((r) => r.name)
  t.equal(new Set(names).size, 3, 'every route gets a distinct name')
  for (const name of names) t.match(name, /^[A-Za-z_][A-Za-z0-9_.-]*$/, 'a derived route name is a tame label value')

  const withVersion = await loadConfigFile(path, { APP_VERSION: '2.4.1' })
  t.equal(withVersion.config.version, '2.4.1', 'APP_VERSION is used when set')
})

t.test('the embedded default config/breakwater.yaml is valid', async (t) => {
  const { config } = await loadConfigFile(join(root, 'config', 'breakwater.yaml'), {})
  t.equal(config.service, 'app')
  t.same(config.upstreams.app?.endpoints, ['http://127.0.0.1:3000'])
  t.equal(config.listen.proxy.port, 14001)
  t.equal(config.listen.ops.port, 14020)
  t.equal(config.listen.admin.port, 14000)
  const withEnv = await loadConfigFile(join(root, 'config', 'breakwater.yaml'), { APP_PORT: '8080', BREAKWATER_SERVICE: 'orders' })
  t.same(withEnv.config.upstreams.app?.endpoints, ['http://127.0.0.1:8080'])
  t.equal(withEnv.config.service, 'orders')
})

t.test('defaults are resolved as documented', async (t) => {
  const config = resolved({
    service: 'shop',
    upstreams: { app: { url: 'http://127.0.0.1:3000' } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }]
  })
  const route = config.routes[0]
  const app = config.upstreams.app
  t.equal(route?.timeoutMs, 15000, 'routes[].timeoutMs')
  t.equal(route?.idleTimeoutMs, 60000, 'routes[].idleTimeoutMs')
  t.equal(route?.retries, null, 'no retries unless configured')
  t.equal(route?.rewritePrefix, null)
  t.equal(app?.connectTimeoutMs, 5000, 'upstreams.X.connectTimeoutMs')
  t.equal(app?.balance, 'round_robin', 'upstreams.X.balance')
  t.equal(app?.critical, false, 'upstreams.X.critical')
  t.equal(app?.healthCheck, null, 'no health check unless configured')
  t.equal(config.shutdown.drainDelayMs, 5000, 'shutdown.drainDelayMs')
  t.equal(config.shutdown.timeoutMs, 20000, 'shutdown.timeoutMs: with drainDelayMs at most 25 s, under the 30 s grace of Kubernetes (SPEC §15)')
  t.equal(config.listen.proxy.port, 14001, 'proxy port')
  t.equal(config.listen.ops.port, 14020, 'ops port')
  t.equal(config.listen.admin.port, 14000, 'admin port')
  t.equal(config.listen.admin.host, '127.0.0.1', 'the admin API listens on loopback by default')
  t.equal(config.listen.egress, null, 'no egress listener unless configured')
  t.equal(config.listen.proxy.keepAliveTimeoutMs, 75000, 'listener keep-alive outlasts load balancers')
  t.equal(config.listen.proxy.requestTimeoutMs, 0, 'no whole-request timeout')
  t.equal(app?.keepAliveTimeoutMs, 4000, 'upstream keep-alive')
  t.equal(config.logging.level, 'info', 'logging.level')
  t.equal(config.logging.accessLogRate, 1, 'logging.accessLog')
  t.equal(config.health.failOnOpenCircuit, 'critical', 'health.failOnOpenCircuit')
  t.same(config.circuitBreakers, {}, 'no circuit breakers unless configured')
  t.same(config.featureFlags, {})
  t.equal(config.flagSource, null)
  t.equal(config.rollback, null, 'no rollback action unless configured')
  t.equal(route?.killSwitch, null)
  t.equal(config.version, 'dev')

  const hc = resolved(minimal({ upstreams: { app: { url: 'http://127.0.0.1:3000', healthCheck: { path: '/healthz' } } } })).upstreams.app?.healthCheck
  t.same(hc, { path: '/healthz', intervalMs: 5000, timeoutMs: 2000, unhealthyThreshold: 3, healthyThreshold: 2 }, 'health check defaults')
  const checkOf = (healthCheck: Record<string, unknown>): unknown => resolved(minimal({ upstreams: { app: { url: 'http://127.0.0.1:3000', healthCheck } } })).upstreams.app?.healthCheck?.timeoutMs
  t.equal(checkOf({ path: '/h', intervalMs: 300 }), 300, 'a short interval alone is valid: the timeout defaults to it')
  t.equal(checkOf({ path: '/h', intervalMs: '1m' }), 2000, 'a long one keeps the 2 s timeout')
  reports(t, problemsOf(t, minimal({ upstreams: { app: { url: 'http://127.0.0.1:3000', healthCheck: { path: '/h', intervalMs: 300, timeoutMs: 500 } } } })), 'upstreams.app.healthCheck.timeoutMs', /must not exceed intervalMs/)

  const retries = resolved(minimal({ routes: [{ match: { pathPrefix: '/' }, upstream: 'app', retries: { attempts: 3 } }] })).routes[0]?.retries
  t.equal(retries?.budgetPercent, 20, 'retries.budgetPercent')

  t.equal(resolved(minimal({ logging: { accessLog: false } })).logging.accessLogRate, 0, 'accessLog false is rate 0')
  t.equal(resolved(minimal({ logging: { accessLog: 0.25 } })).logging.accessLogRate, 0.25, 'accessLog may be a sample rate')
})

t.test('notifications: a channel or service named without what delivers to it is a warning', async (t) => {
  const warnings = (notifications: Record<string, unknown>): string[] => resolveConfig(minimal({ notifications }), { env: {} }).warnings.filter((w) => w.startsWith('notifications.'))
  t.same(warnings({ slackChannel: '#incidents-prod' }), ['notifications.slackWebhookUrl: not set; Slack messages to #incidents-prod are not sent'])
  t.same(warnings({ pagerDutyServiceId: 'PXXXXXX' }), ['notifications.pagerDutyRoutingKey: not set; PagerDuty events are not sent'])
  t.same(warnings({ slackWebhookUrl: 'https://hooks.slack.example/services/x' }), ['notifications.slackChannel: not set; Slack messages go to the webhook\'s default channel'])
  t.same(warnings({ slackChannel: '#incidents-prod', slackWebhookUrl: 'https://hooks.slack.example/services/x', pagerDutyServiceId: 'PXXXXXX', pagerDutyRoutingKey: 'key' }), [], 'none when each has its delivery setting')
})

t.test('the resolved config is frozen, all the way down', async (t) => {
  const config = resolved(minimal({ upstreams: { app: { endpoints: ['http://127.0.0.1:3000', 'http://127.0.0.1:3001'] } } }))
  t.ok(Object.isFrozen(config))
  t.ok(Object.isFrozen(config.listen.proxy))
  t.ok(Object.isFrozen(config.routes))
  t.ok(Object.isFrozen(config.routes[0]))
  t.ok(Object.isFrozen(config.routes[0]?.match))
  t.ok(Object.isFrozen(config.upstreams))
  t.ok(Object.isFrozen(config.upstreams.app?.endpoints))
  t.throws(() => { (config as { service: string }).service = 'other' }, TypeError)
  t.throws(() => { (config.routes as unknown as unknown[]).push({}) }, TypeError)
  t.throws(() => { (config.upstreams.app?.endpoints as string[])[0] = 'http://evil' }, TypeError)
  t.equal(config.service, 'shop')
})

t.test('every problem is reported in one run, each with its key path', async (t) => {
  const problems = problemsOf(t, {
    service: 'shop',
    colour: 'blue',
    listen: { proxy: { host: '127.0.0.1', port: 70000, hots: 'x' }, ops: { port: 'abc' } },
    upstreams: {
      app: { url: 'http://127.0.0.1:3000', healthCheck: { path: '/healthz', intervl: 1000 } },
      both: { url: 'http://127.0.0.1:3001', endpoints: ['http://127.0.0.1:3002'] },
      neither: { critical: true },
      pathy: { url: 'http://127.0.0.1:3003/api' },
      ftp: { url: 'ftp://127.0.0.1:21' },
      creds: { endpoints: ['http://127.0.0.1:3004', 'http://user:pw@127.0.0.1:3005'] },
      slow: { url: 'http://127.0.0.1:3006', connections: 0, balance: 'random' }
    },
    routes: [
      { name: 'main', match: { pathPrefix: '/', method: 'GET' }, upstream: 'ghost' },
      { name: 'main', match: { pathPrefix: '/b' }, upstream: 'app', retries: { attempts: 11 } },
      { match: { pathPrefix: '/c' }, upstream: 'app', timeoutMs: 'soon' },
      { match: { pathPrefix: '/d' }, upstream: 'app', killSwitch: 'undeclaredFlag' }
    ],
    featureFlags: { newCheckout: 'yes' },
    circuitBreakers: { app: { failureThreshold: 1.5, trip: true }, nowhere: {} },
    shutdown: { drainDelayMs: '5 seconds', timeoutMs: -1 },
    logging: { level: 'loud', accessLog: 2 }
  })
  reports(t, problems, 'colour', /unknown key/)
  reports(t, problems, 'listen.proxy.hots', /unknown key/)
  reports(t, problems, 'upstreams.app.healthCheck.intervl', /unknown key/)
  reports(t, problems, 'routes[0].match.method', /unknown key/)
  reports(t, problems, 'listen.proxy.port', /<= 65535/)
  reports(t, problems, 'listen.ops.port', /integer/)
  reports(t, problems, 'upstreams.both', /exactly one of url or endpoints/)
  reports(t, problems, 'upstreams.neither', /exactly one of url or endpoints/)
  reports(t, problems, 'upstreams.pathy.url', /origin/)
  reports(t, problems, 'upstreams.ftp.url', /http/)
  reports(t, problems, 'upstreams.creds.endpoints[1]', /origin/)
  reports(t, problems, 'upstreams.slow.connections', />= 1/)
  reports(t, problems, 'upstreams.slow.balance', /round_robin/)
  reports(t, problems, 'routes[0].upstream', /unknown upstream "ghost"/)
  reports(t, problems, 'routes[1].name', /duplicate route name "main"/)
  reports(t, problems, 'routes[1].retries.attempts', /<= 10/)
  reports(t, problems, 'routes[2].timeoutMs', /milliseconds/)
  reports(t, problems, 'routes[3].killSwitch', /undeclaredFlag/)
  reports(t, problems, 'featureFlags.newCheckout', /true or false/)
  reports(t, problems, 'circuitBreakers.app.failureThreshold', /must be <= 1/)
  reports(t, problems, 'circuitBreakers.app.trip', /unknown key/)
  reports(t, problems, 'circuitBreakers.nowhere', /unknown upstream/)
  reports(t, problems, 'shutdown.drainDelayMs', /milliseconds/)
  reports(t, problems, 'shutdown.timeoutMs')
  reports(t, problems, 'logging.level', /"info"/)
  reports(t, problems, 'logging.accessLog')
  t.equal(new Set(problems).size, problems.length, 'no line is repeated')
  for (const p of problems) t.match(p, /^[A-Za-z(][^:]*: \S/, `"${p}" starts with a key path`)
})

t.test('a rollback action that matches none of its kinds: the problems of the kind its type names, each at its key', async (t) => {
  const url = 'https://cd.example/rollback'
  const cases: Array<[string, unknown, string[]]> = [
    ['a malformed cooldown', { type: 'webhook', url, cooldown: 'soon' }, ['rollback.cooldown']],
    ['a malformed requireRecentChange', { type: 'webhook', url, requireRecentChange: 'maybe' }, ['rollback.requireRecentChange']],
    ['an unknown key and a missing branch', { type: 'git', repo: '/srv/deploy.git', bogus: 1 }, ['rollback.bogus', 'rollback.branch']],
    ['a missing url', { type: 'webhook' }, ['rollback.url']],
    ['an unknown type', { type: 'helm' }, ['rollback.type']],
    ['no type', { url }, ['rollback.type']]
  ]
  for (const [what, rollback, keys] of cases) {
    const problems = problemsOf(t, minimal({ rollback }))
    t.same(problems.map((p) => p.slice(0, p.indexOf(': '))).sort(), [...keys].sort(), `${what}: ${problems.join(' | ')}`)
  }
  reports(t, problemsOf(t, minimal({ rollback: { type: 'webhook', url, requireRecentChange: 'maybe' } })), 'rollback.requireRecentChange', /milliseconds, a string such as 30m, or false/)
  reports(t, problemsOf(t, minimal({ rollback: { type: 'helm' } })), 'rollback.type', /one of "webhook", "exec", "git" \(got "helm"\)/)
  reports(t, problemsOf(t, minimal({ rollback: 5 })), 'rollback', /must be a rollback action/)
})

t.test('cross-section checks still run when a duration is malformed', async (t) => {
  // A bad duration must not hide the problems found after it (one run lists them all).
  const problems = problemsOf(t, {
    service: 'shop',
    upstreams: { app: { url: 'http://127.0.0.1:3000', connectTimeoutMs: '5 sec' } },
    routes: [
      { name: 'a', match: { pathPrefix: '/a' }, upstream: 'ghost', timeoutMs: '1 minute' },
      { name: 'a', match: { pathPrefix: '/b' }, upstream: 'app' }
    ],
    circuitBreakers: { ghost: { recoveryTimeout: 'half a minute' } }
  })
  reports(t, problems, 'upstreams.app.connectTimeoutMs', /milliseconds/)
  reports(t, problems, 'routes[0].timeoutMs', /milliseconds/)
  reports(t, problems, 'routes[0].upstream', /unknown upstream "ghost"/)
  reports(t, problems, 'routes[1].name', /duplicate route name "a"/)
  reports(t, problems, 'circuitBreakers.ghost.recoveryTimeout', /milliseconds/)
  reports(t, problems, 'circuitBreakers.ghost', /unknown upstream/)
})

t.test('two listeners on one port are a config problem named by key, not a failed start', async (t) => {
  const base = { service: 'shop', upstreams: { app: { url: 'http://127.0.0.1:3000' } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }] }
  const problems = problemsOf(t, { ...base, listen: { proxy: { host: '0.0.0.0', port: 14001 }, ops: { host: '127.0.0.1', port: 14001 }, admin: { host: '127.0.0.1', port: 14020 }, egress: { host: '127.0.0.1', port: 14020 } } })
  reports(t, problems, 'listen.ops.port', /14001 is also listen\.proxy's port/)
  reports(t, problems, 'listen.admin.port', /14020 is also listen\.egress's port/)
  // Port 0 is any free port; one port on two distinct addresses is two sockets.
  const fine = resolved({ ...base, listen: { proxy: { host: '127.0.0.1', port: 0 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.2', port: 14001 }, egress: { host: '127.0.0.1', port: 14001 } } })
  t.equal(fine.listen.admin.port, 14001)
})

t.test('values of the wrong type in the file are reported, not coerced', async (t) => {
  // Conversion exists for values that came from ${ENV} (always strings); a literal of the
  // wrong type in the file is the user's mistake and must be reported.
  const cases: Array<[string, Record<string, unknown>, string]> = [
    ['a boolean port', minimal({ listen: { proxy: { port: true } } }), 'listen.proxy.port'],
    ['a fractional port', minimal({ listen: { proxy: { port: 1.5 } } }), 'listen.proxy.port'],
    ['a number for a boolean', minimal({ upstreams: { app: { url: 'http://127.0.0.1:3000', critical: 1 } } }), 'upstreams.app.critical'],
    ['a string for a list', minimal({ routes: [{ match: { pathPrefix: '/', methods: 'GET' }, upstream: 'app' }] }), 'routes[0].match.methods'],
    ['a fractional millisecond count', minimal({ shutdown: { timeoutMs: 1.5 } }), 'shutdown.timeoutMs']
  ]
  for (const [what, raw, key] of cases) {
    let problems: string[] = []
    try {
      resolveConfig(raw, { env: {} })
      t.fail(`${what} was accepted (and silently converted)`)
      continue
    } catch (err) {
      problems = [...(err as ConfigError).problems]
    }
    reports(t, problems, key)
  }
})

t.test('${ENV} and ${ENV:-default} are expanded', async (t) => {
  const config = resolved({
    service: '${SERVICE}',
    version: '${VERSION:-0.0.0}',
    listen: { proxy: { port: '${PORT:-14001}' }, ops: { port: '${OPS_PORT:-14020}' } },
    upstreams: { app: { url: 'http://${APP_HOST}:${APP_PORT:-3000}', critical: '${CRITICAL:-false}' } },
    routes: [{ match: { pathPrefix: '/', headers: { 'x-tenant': '$${TENANT}' } }, upstream: 'app', timeoutMs: '${TIMEOUT:-2s}' }],
    logging: { accessLog: '${SAMPLE:-0.5}', level: '${LEVEL:-warn}' }
  }, { SERVICE: 'orders', APP_HOST: 'app.internal', OPS_PORT: '9090', CRITICAL: 'true', TENANT: 'no', TIMEOUT: '' })
  t.equal(config.service, 'orders')
  t.equal(config.version, '0.0.0', 'default used when unset')
  t.equal(config.listen.proxy.port, 14001, 'a number from a default')
  t.equal(config.listen.ops.port, 9090, 'a number from the environment')
  t.same(config.upstreams.app?.endpoints, ['http://app.internal:3000'], 'several references in one string')
  t.equal(config.upstreams.app?.critical, true, 'a boolean from the environment')
  t.same(config.routes[0]?.match.headers, [['x-tenant', '${TENANT}']], '$${X} stays literal')
  t.equal(config.routes[0]?.timeoutMs, 2000, 'an empty variable takes the default')
  t.equal(config.logging.accessLogRate, 0.5, 'a sample rate from a default')
  t.equal(config.logging.level, 'warn')

  const fromEnv = resolved(minimal({ listen: { proxy: { port: '${PORT:-14001}' } } }), { PORT: '18080' })
  t.equal(fromEnv.listen.proxy.port, 18080)

  const unset = problemsOf(t, minimal({
    upstreams: { app: { url: 'http://127.0.0.1:${APP_PORT}' } },
    listen: { proxy: { port: '${PROXY_PORT}' } }
  }))
  reports(t, unset, 'upstreams.app.url', /APP_PORT is not set/)
  reports(t, unset, 'listen.proxy.port', /PROXY_PORT is not set/)
  const empty = problemsOf(t, minimal({ listen: { proxy: { port: '${PROXY_PORT}' } } }), { PROXY_PORT: '' })
  reports(t, empty, 'listen.proxy.port', /PROXY_PORT is empty/)

  const outOfRange = problemsOf(t, minimal({ listen: { proxy: { port: '${PORT}' } } }), { PORT: '70000' })
  reports(t, outOfRange, 'listen.proxy.port', /<= 65535/)
  const notANumber = problemsOf(t, minimal({ listen: { proxy: { port: '${PORT}' } } }), { PORT: 'eighty' })
  reports(t, notANumber, 'listen.proxy.port')
})

t.test('a ${ that is no reference Breakwater expands is a problem naming its key, never left as literal text', async (t) => {
  const cases: Array<[string, string, RegExp]> = [
    ['http://${APP_HOST-localhost}:3000', 'upstreams.app.url', /"\$\{APP_HOST-…" \(character 8\) is not a reference/],
    ['http://${1HOST}:3000', 'upstreams.app.url', /"\$\{1HOST\}"/],
    ['http://${APP_HOST', 'upstreams.app.url', /"\$\{APP_HOST" \(character 8\)/],
    ['http://${APP_HOST:-${OTHER}}', 'upstreams.app.url', /"\$\{APP_HOST:…"/],
    ['http://${APP_HOST:?required}', 'upstreams.app.url', /no other shell form/]
  ]
  for (const [url, key, message] of cases) {
    const problems = problemsOf(t, minimal({ upstreams: { app: { url } } }), { APP_HOST: 'app.internal', OTHER: 'x' })
    reports(t, problems, key, message)
  }
  // The part after the name may be a secret written in the file: never shown.
  const secret = problemsOf(t, minimal({ fleet: { etcd: { endpoints: ['http://127.0.0.1:2379'], password: 'pa${ss-w0rd-do-not-show' } } }))
  reports(t, secret, 'fleet.etcd.password', /"\$\{ss-…"/)
  t.notOk(secret.join('\n').includes('w0rd'), 'the rest of the value is not in the message')
  // Free text another reader expands keeps it: an exec rollback's shell, a fallback page.
  const free = resolved(minimal({
    rollback: { type: 'exec', command: ['sh', '-c', 'echo "${1}" "${TAG%.*}" ${HOME}'] },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', fallback: { status: 503, body: '<script>say(`${user.name}`)</script>' } }]
  }), { HOME: '/home/app' })
  t.same(free.rollback?.type === 'exec' ? free.rollback.command : null, ['sh', '-c', 'echo "${1}" "${TAG%.*}" /home/app'], 'the shell reads ${1}; references are still expanded')
  t.equal(free.routes[0]?.fallback?.static?.body.toString(), '<script>say(`${user.name}`)</script>')
  // $${ is the literal ${, whatever follows it.
  const literal = resolved(minimal({ routes: [{ match: { pathPrefix: '/', headers: { 'x-template': '$${1BAD} and $${V' } }, upstream: 'app' }] }))
  t.same(literal.routes[0]?.match.headers, [['x-template', '${1BAD} and ${V']])
})

t.test('a shutdown longer than Kubernetes\' default grace is a warning naming the grace to raise', async (t) => {
  const shutdownWarnings = (shutdown?: Record<string, unknown>): string[] =>
    resolveConfig(minimal(shutdown === undefined ? {} : { shutdown }), { env: {} }).warnings.filter((w) => w.startsWith('shutdown:'))
  t.same(shutdownWarnings(), [], 'the defaults (5 s + 20 s) fit')
  t.same(shutdownWarnings({ drainDelayMs: '10s', timeoutMs: '15s' }), [], '25 s fits')
  const long = shutdownWarnings({ drainDelayMs: '30s', timeoutMs: '20s' })
  t.equal(long.length, 1)
  t.match(long[0], /drainDelayMs \+ timeoutMs is 50 s, past the 25 s .* raise the pod's terminationGracePeriodSeconds/)
})

t.test('durations: ms, s, m, h and plain numbers', async (t) => {
  t.equal(toMs(250), 250)
  t.equal(toMs('500ms'), 500)
  t.equal(toMs('5s'), 5000)
  t.equal(toMs('1.5s'), 1500)
  t.equal(toMs('2m'), 120_000)
  t.equal(toMs('1h'), 3_600_000)
  t.throws(() => toMs('5 s'))
  t.throws(() => toMs('5d'))
  // While a config is built, a duration the schema already refused reads as 0 (one run lists every problem).
  t.equal(durationMs('2m'), 120_000)
  t.equal(durationMs(250), 250)
  t.equal(durationMs('5d'), 0)

  const config = resolved(minimal({
    upstreams: { app: { url: 'http://127.0.0.1:3000', connectTimeoutMs: '2m', healthCheck: { path: '/h', intervalMs: '1h', timeoutMs: '500ms' } } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', timeoutMs: '5s', idleTimeoutMs: 1234 }],
    shutdown: { drainDelayMs: '500ms', timeoutMs: '1h' }
  }))
  t.equal(config.upstreams.app?.connectTimeoutMs, 120_000)
  t.equal(config.upstreams.app?.healthCheck?.intervalMs, 3_600_000)
  t.equal(config.upstreams.app?.healthCheck?.timeoutMs, 500)
  t.equal(config.routes[0]?.timeoutMs, 5000)
  t.equal(config.routes[0]?.idleTimeoutMs, 1234)
  t.equal(config.shutdown.drainDelayMs, 500)
  t.equal(config.shutdown.timeoutMs, 3_600_000)

  for (const bad of ['5 s', '1d', 'soon', '-5s', '']) {
    const problems = problemsOf(t, minimal({ shutdown: { drainDelayMs: bad } }))
    reports(t, problems, 'shutdown.drainDelayMs')
  }
  reports(t, problemsOf(t, minimal({ shutdown: { drainDelayMs: -5 } })), 'shutdown.drainDelayMs')
})

t.test('YAML, YML and JSON files', async (t) => {
  const dir = tempDir(t)
  const input = minimal({ version: '${V:-1.2.3}', shutdown: { drainDelayMs: '1s' } })
  const json = join(dir, 'c.json')
  writeFileSync(json, JSON.stringify(input))
  const yml = join(dir, 'c.yml')
  writeFileSync(yml, 'service: shop\nversion: ${V:-1.2.3}\nupstreams:\n  app: { url: "http://127.0.0.1:3000" }\nroutes:\n  - match: { pathPrefix: / }\n    upstream: app\nshutdown: { drainDelayMs: 1s }\n')
  for (const path of [json, yml]) {
    const { config } = await loadConfigFile(path, {})
    t.equal(config.service, 'shop', path)
    t.equal(config.version, '1.2.3', `${path}: env defaults expanded`)
    t.equal(config.shutdown.drainDelayMs, 1000)
    t.equal(config.source, path)
  }

  const brokenYaml = join(dir, 'broken.yaml')
  writeFileSync(brokenYaml, 'service: shop\nupstreams: [unclosed\n')
  await t.rejects(loadConfigFile(brokenYaml, {}), { name: 'ConfigError', message: /broken\.yaml.*YAML/ })
  const brokenJson = join(dir, 'broken.json')
  writeFileSync(brokenJson, '{"service": ')
  await t.rejects(loadConfigFile(brokenJson, {}), { name: 'ConfigError', message: /broken\.json.*JSON/ })
  await t.rejects(loadConfigFile(join(dir, 'missing.yaml'), {}), { name: 'ConfigError', message: /missing\.yaml: file not found/ })
  const toml = join(dir, 'c.toml')
  writeFileSync(toml, 'service = "shop"\n')
  await t.rejects(loadConfigFile(toml, {}), { name: 'ConfigError', message: /unsupported/ })
  const list = join(dir, 'list.yaml')
  writeFileSync(list, '- a\n- b\n')
  await t.rejects(loadConfigFile(list, {}), { name: 'ConfigError', message: /must be an object/ })
})

t.test('.mjs modules: a default export object, a function, and defineConfig', async (t) => {
  const dir = tempDir(t)
  const index = pathToFileURL(join(root, 'dist', 'index.js')).href
  const body = JSON.stringify(minimal({ version: '${V:-from-module}' }))

  const object = join(dir, 'object.mjs')
  writeFileSync(object, `export default ${body}\n`)
  const fn = join(dir, 'function.mjs')
  writeFileSync(fn, `export default async () => ({ ...${body}, service: 'made-by-function' })\n`)
  const typed = join(dir, 'typed.mjs')
  writeFileSync(typed, `import { defineConfig } from ${JSON.stringify(index)}\nexport default defineConfig(${body})\n`)

  const a = await loadConfigFile(object, {})
  t.equal(a.config.service, 'shop')
  t.equal(a.config.version, 'from-module', '${ENV} expanded in module output too')
  const b = await loadConfigFile(fn, {})
  t.equal(b.config.service, 'made-by-function')
  const c = await loadConfigFile(typed, { V: '9.9.9' })
  t.equal(c.config.version, '9.9.9')

  const invalid = join(dir, 'invalid.mjs')
  writeFileSync(invalid, 'export default { service: "shop", upstreams: {}, routes: [], extra: 1 }\n')
  const err = await loadConfigFile(invalid, {}).then(() => null, (e: unknown) => e as ConfigError)
  t.type(err, ConfigError)
  t.ok(err?.problems.some((p) => p.startsWith('extra: ')), 'a module\'s config is validated like a file\'s', { problems: err?.problems })

  const throwing = join(dir, 'throwing.mjs')
  writeFileSync(throwing, 'throw new Error("boom")\n')
  await t.rejects(loadConfigFile(throwing, {}), { name: 'ConfigError', message: /throwing\.mjs.*boom/ })
})

t.test('.mjs modules that export nothing, or whose function fails, are refused naming the file', async (t) => {
  const dir = tempDir(t)
  const none = join(dir, 'none.mjs')
  writeFileSync(none, 'export const settings = { service: "shop" }\n')
  await t.rejects(loadConfigFile(none, {}), { name: 'ConfigError', message: /none\.mjs: exports no config/ })
  const failing = join(dir, 'failing.mjs')
  writeFileSync(failing, 'export default async () => { throw new Error("vault unreachable") }\n')
  await t.rejects(loadConfigFile(failing, {}), { name: 'ConfigError', message: /failing\.mjs: the exported function failed: vault unreachable/ })
  const lazy = join(dir, 'lazy.mjs')
  writeFileSync(lazy, 'export default { service: "shop", upstreams: { app: { url: "http://127.0.0.1:3000", connectTimeoutMs: () => 5 } }, routes: [{ match: {}, upstream: "app" }] }\n')
  const err = await loadConfigFile(lazy, {}).then(() => null, (e: unknown) => e as ConfigError)
  t.type(err, ConfigError)
  t.same(err?.problems, ['upstreams.app.connectTimeoutMs: a function is not a config value (write the value itself)'], 'a function where a value belongs is named by its key')
})

t.test('the committed JSON schema matches the code', async (t) => {
  const committed = readFileSync(join(root, 'config', 'breakwater.schema.json'), 'utf8')
  t.ok(committed === schemaJson(), 'config/breakwater.schema.json is out of date with src/config/schema.ts: run `npm run schema` and commit the result')
  const schema = JSON.parse(committed) as { additionalProperties?: boolean, required?: string[] }
  t.equal(schema.additionalProperties, false, 'unknown top-level keys are errors')
  t.same(schema.required?.slice().sort(), ['routes', 'service', 'upstreams'])
})
