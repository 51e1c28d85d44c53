/**
 * Fault injection for game days (routes[].fault): a share of requests aborted with
 * `abortStatus`, a share delayed by `delayMs`; marked with `x-breakwater-fault` and counted in
 * `breakwater_faults_injected_total{route,type}`; switched at run time by `fault.flag`; off
 * unless configured. Shares are checked against binomial bounds of ±5 σ, so a correct
 * implementation fails about once in 1.7 million runs.
 */
import t, { type Test } from 'tap'
import { Pool } from 'undici'
import { startApp, type App } from './helpers/app.js'
import { startTestSidecar, type TestSidecar } from './helpers/sidecar.js'
import { admin } from './helpers/admin.js'
import { scrape, sumOf, hasSample } from './helpers/metrics.js'

t.setTimeout(120_000)

interface Answer {
  status: number
  fault: string | undefined
  error: string | undefined
  body: string
  ms: number
}

/** `n` GETs of `path` through the proxy, 32 connections; every answer with its marks and time. */
async function many (t: Test, base: string, path: string, n: number): Promise<Answer[]> {
  const pool = new Pool(base, { connections: 32 })
  t.teardown(async () => { await pool.destroy() })
  return await Promise.all(Array.from({ length: n }, async () => {
    const started = performance.now()
    const res = await pool.request({ path, method: 'GET' })
    const body = await res.body.text()
    const header = (name: string): string | undefined => {
      const v = res.headers[name]
      return Array.isArray(v) ? v.join(',') : v
    }
    return { status: res.statusCode, fault: header('x-breakwater-fault'), error: header('x-breakwater-error'), body, ms: performance.now() - started }
  }))
}

/** Whether `k` successes of `n` trials lie within ±5 σ of a binomial(n, p). */
function withinBounds (k: number, n: number, p: number): { ok: boolean, text: string } {
  const mean = n * p
  const sigma = Math.sqrt(n * p * (1 - p))
  return { ok: Math.abs(k - mean) <= 5 * sigma, text: `${k} of ${n}, expected ${mean.toFixed(0)} ± ${(5 * sigma).toFixed(0)} (5 σ)` }
}

async function sidecar (t: Test, routes: Array<Record<string, unknown>>, extra: Record<string, unknown> = {}): Promise<{ app: App, s: TestSidecar }> {
  const app = await startApp(t)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: app.url } },
    routes: [...routes, { name: 'plain', match: { pathPrefix: '/' }, upstream: 'app' }],
    logging: { level: 'info', accessLog: true },
    ...extra
  })
  return { app, s }
}

const received = (app: App, prefix: string): number => app.received.filter((r) => r.url.startsWith(prefix)).length

t.test('abortPercent 30: about 30 % aborted with abortStatus, marked, counted; the rest reach the app untouched', async (t) => {
  const { app, s } = await sidecar(t, [{ name: 'chaos', match: { pathPrefix: '/chaos' }, upstream: 'app', fault: { abortPercent: 30, abortStatus: 500 } }])
  const n = 1000
  const answers = await many(t, s.proxy, '/chaos/item', n)
  const aborted = answers.filter((a) => a.fault === 'abort')
  const passed = answers.filter((a) => a.fault === undefined)
  const bounds = withinBounds(aborted.length, n, 0.3)
  t.ok(bounds.ok, `aborted ${bounds.text}`)
  t.equal(aborted.length + passed.length, n, 'every answer is either aborted or untouched')
  t.ok(aborted.every((a) => a.status === 500), 'aborted with abortStatus 500')
  t.ok(aborted.every((a) => a.error === 'fault_injected'), 'x-breakwater-error: fault_injected')
  t.ok(aborted.every((a) => (JSON.parse(a.body) as { error: string }).error === 'fault_injected'), 'JSON body error fault_injected')
  t.ok(passed.every((a) => a.status === 200 && (JSON.parse(a.body) as { ok: boolean }).ok), 'the others are the app\'s own 200s')
  t.equal(received(app, '/chaos'), passed.length, 'an aborted request never reaches the app')

  const samples = await scrape(s.ops)
  t.equal(sumOf(samples, 'breakwater_faults_injected_total', { route: 'chaos', type: 'abort' }), aborted.length, 'breakwater_faults_injected_total{route="chaos",type="abort"}')
  t.notOk(hasSample(samples, 'breakwater_faults_injected_total', { type: 'delay' }), 'no delay counted')
  t.equal(sumOf(samples, 'breakwater_requests_total', { route: 'chaos', code: '500' }), aborted.length, 'the aborts are in the request counts with their status')

  // The default abortStatus is 503.
  const { s: s2 } = await sidecar(t, [{ name: 'chaos', match: { pathPrefix: '/chaos' }, upstream: 'app', fault: { abortPercent: 100 } }])
  const all = await many(t, s2.proxy, '/chaos', 20)
  t.ok(all.every((a) => a.status === 503 && a.fault === 'abort'), 'abortPercent 100 without abortStatus: every request 503')
})

t.test('delayPercent 100, delayMs 200: every request at least 200 ms later, marked and counted', async (t) => {
  const { app, s } = await sidecar(t, [{ name: 'slow', match: { pathPrefix: '/slow' }, upstream: 'app', fault: { delayPercent: 100, delayMs: 200 } }])
  const answers = await many(t, s.proxy, '/slow/item', 20)
  t.ok(answers.every((a) => a.status === 200), 'delayed, then answered by the app')
  t.ok(answers.every((a) => a.fault === 'delay'), 'x-breakwater-fault: delay')
  const fastest = Math.min(...answers.map((a) => a.ms))
  t.ok(fastest >= 195, `the fastest took ${fastest.toFixed(0)} ms (≥ 200 ms, less timer rounding)`)
  t.equal(received(app, '/slow'), 20)
  const plain = await many(t, s.proxy, '/plain', 20)
  t.ok(plain.every((a) => a.fault === undefined && a.status === 200), 'another route is untouched (not delayed, not marked)')
  const samples = await scrape(s.ops)
  t.equal(sumOf(samples, 'breakwater_faults_injected_total', { route: 'slow', type: 'delay' }), 20)
  t.notOk(hasSample(samples, 'breakwater_faults_injected_total', { route: 'plain' }))
  const lines = s.logs.filter((l) => l.msg === 'request' && l.route === 'slow')
  t.equal(lines.length, 20, 'one access-log line per delayed request')
  t.ok(lines.every((l) => Number(l.durationMs) >= 195), 'their durations include the delay')
  t.ok(lines.every((l) => l.fault === 'delay'), 'the access log marks the injected delay (`fault`)')
})

t.test('abortPercent 20 with delayPercent 50: both shares within bounds; delays only on requests not aborted', async (t) => {
  const { app, s } = await sidecar(t, [{ name: 'mixed', match: { pathPrefix: '/mixed' }, upstream: 'app', fault: { abortPercent: 20, abortStatus: 502, delayPercent: 50, delayMs: 30 } }])
  const n = 1000
  const answers = await many(t, s.proxy, '/mixed', n)
  const aborted = answers.filter((a) => a.fault === 'abort')
  const rest = answers.filter((a) => a.fault !== 'abort')
  const delayed = rest.filter((a) => a.fault === 'delay')
  const abortBounds = withinBounds(aborted.length, n, 0.2)
  t.ok(abortBounds.ok, `aborted ${abortBounds.text}`)
  const delayBounds = withinBounds(delayed.length, rest.length, 0.5)
  t.ok(delayBounds.ok, `delayed (of those not aborted) ${delayBounds.text}`)
  t.ok(aborted.every((a) => a.status === 502))
  t.ok(rest.every((a) => a.status === 200))
  t.ok(delayed.every((a) => a.ms >= 28), 'each delayed answer took ≥ delayMs')
  t.equal(received(app, '/mixed'), rest.length)
  const samples = await scrape(s.ops)
  t.equal(sumOf(samples, 'breakwater_faults_injected_total', { route: 'mixed', type: 'abort' }), aborted.length)
  t.equal(sumOf(samples, 'breakwater_faults_injected_total', { route: 'mixed', type: 'delay' }), delayed.length)
})

t.test('fault.flag switches the fault at run time through the admin API', async (t) => {
  const { app, s } = await sidecar(t, [
    { name: 'switched', match: { pathPrefix: '/switched' }, upstream: 'app', fault: { abortPercent: 100, abortStatus: 503, flag: 'gameDay' } }
  ], { featureFlags: { gameDay: false } })
  const off = await many(t, s.proxy, '/switched', 30)
  t.ok(off.every((a) => a.status === 200 && a.fault === undefined), 'flag off: no fault')

  const on = await admin(s.admin, 'PUT', '/v1/flags/gameDay', { enabled: true, reason: 'game day: checkout dependency outage' })
  t.equal(on.status, 200)
  const during = await many(t, s.proxy, '/switched', 30)
  t.ok(during.every((a) => a.status === 503 && a.fault === 'abort' && a.error === 'fault_injected'), 'flag on: the very next requests are aborted')
  t.ok(during.every((a) => (JSON.parse(a.body) as { error: string }).error === 'fault_injected'))

  t.equal((await admin(s.admin, 'PUT', '/v1/flags/gameDay', { enabled: false, reason: 'game day over' })).status, 200)
  const after = await many(t, s.proxy, '/switched', 30)
  t.ok(after.every((a) => a.status === 200 && a.fault === undefined), 'flag off again: no fault')

  t.equal((await admin(s.admin, 'PUT', '/v1/flags/gameDay', { enabled: true, reason: 'again' })).status, 200)
  t.ok((await many(t, s.proxy, '/switched', 5)).every((a) => a.fault === 'abort'))
  t.equal((await admin(s.admin, 'DELETE', '/v1/flags/gameDay', { reason: 'back to the config' })).status, 200)
  t.ok((await many(t, s.proxy, '/switched', 30)).every((a) => a.status === 200 && a.fault === undefined), 'override dropped: back to featureFlags (off)')

  t.equal(received(app, '/switched'), 90, 'only the requests without a fault reached the app')
  const samples = await scrape(s.ops)
  t.equal(sumOf(samples, 'breakwater_faults_injected_total', { route: 'switched', type: 'abort' }), 35)
})

t.test('no fault configured: none injected, none counted', async (t) => {
  const { app, s } = await sidecar(t, [])
  const answers = await many(t, s.proxy, '/anything', 300)
  t.ok(answers.every((a) => a.status === 200 && a.fault === undefined), 'every request answered by the app, unmarked')
  t.equal(received(app, '/anything'), 300)
  const samples = await scrape(s.ops)
  t.equal(sumOf(samples, 'breakwater_faults_injected_total'), 0)
  t.notOk(s.logs.some((l) => l.msg === 'request' && (l.fault !== undefined || l['error.type'] === 'fault_injected')))
})
