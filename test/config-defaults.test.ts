/**
 * Defaults are declared once, in the schema: the generated JSON schema shows them to editors,
 * and the loader fills in exactly those.
 */
import t from 'tap'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { resolveConfig } from '../src/config/load.js'
import { toMs } from '../src/config/duration.js'
import { ROOT } from './helpers/root.js'

type Schema = { default?: unknown, properties?: Record<string, Schema>, items?: Schema, patternProperties?: Record<string, Schema> }
const schema = JSON.parse(readFileSync(join(ROOT, 'config', 'breakwater.schema.json'), 'utf8')) as Schema

/** The schema node at a dotted path (`[]` steps into list items, `*` into map values). */
function node (path: string): Schema {
  let s: Schema | undefined = schema
  for (const step of path.split('.')) {
    s = step === '[]' ? s?.items : step === '*' ? Object.values(s?.patternProperties ?? {})[0] : s?.properties?.[step]
  }
  if (s === undefined) throw new Error(`no schema at ${path}`)
  return s
}

/** A duration default such as `10m` as the loader resolves it; anything else as it is. */
const asMs = (v: unknown): unknown => typeof v === 'string' && /^[0-9.]+(ms|s|m|h)$/.test(v) ? toMs(v) : v

t.test('the loader fills in the defaults the JSON schema shows', async (t) => {
  const { config } = resolveConfig({
    service: 's',
    upstreams: { app: { url: 'http://127.0.0.1:3000', healthCheck: { path: '/h' } } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', retries: { attempts: 1 } }],
    circuitBreakers: { app: {} },
    rollback: { type: 'exec', command: ['true'] },
    rollbackTriggers: [{ metric: 'error_rate', threshold: 0.5, window: '1m', action: 'notify' }]
  }, { env: {} })
  const up = config.upstreams.app
  const route = config.routes[0]
  const pairs: Array<[string, unknown]> = [
    ['version', config.version],
    ['listen.proxy.port', config.listen.proxy.port],
    ['listen.proxy.keepAliveTimeoutMs', config.listen.proxy.keepAliveTimeoutMs],
    ['listen.ops.port', config.listen.ops.port],
    ['listen.admin.host', config.listen.admin.host],
    ['upstreams.*.connectTimeoutMs', up?.connectTimeoutMs],
    ['upstreams.*.keepAliveTimeoutMs', up?.keepAliveTimeoutMs],
    ['upstreams.*.connections', up?.connections],
    ['upstreams.*.healthCheck.intervalMs', up?.healthCheck?.intervalMs],
    ['upstreams.*.ejection.consecutiveFailures', up?.ejection.consecutiveFailures],
    ['routes.[].timeoutMs', route?.timeoutMs],
    ['routes.[].idleTimeoutMs', route?.idleTimeoutMs],
    ['routes.[].retries.budgetPercent', route?.retries?.budgetPercent],
    ['circuitBreakers.*.failureThreshold', config.circuitBreakers.app?.failureThreshold],
    ['circuitBreakers.*.failureStatuses', config.circuitBreakers.app?.failureStatuses],
    ['rollbackTriggers.[].minRequests', config.rollbackTriggers[0]?.minRequests],
    ['notifications.queueSize', config.notifications.queueSize],
    ['verification.timeoutMs', config.verification.timeoutMs],
    ['health.failOnOpenCircuit', config.health.failOnOpenCircuit],
    ['shutdown.drainDelayMs', config.shutdown.drainDelayMs],
    ['shutdown.timeoutMs', config.shutdown.timeoutMs],
    ['logging.level', config.logging.level],
    ['limits.maxEventLoopDelayMs', config.limits.maxEventLoopDelayMs]
  ]
  for (const [path, resolved] of pairs) {
    const declared = node(path).default
    t.not(declared, undefined, `${path} declares a default`)
    t.same(resolved, asMs(declared), `${path}: the loader uses the declared default`)
  }
  t.equal(config.listen.egress, null, 'a section that is off when absent has no default')
  t.equal(node('listen.egress').default, undefined)
  t.equal(node('listen.egress.port').default, 14002, 'the egress listener has its own port default')
})
