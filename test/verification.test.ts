/**
 * Verification of restoration (SPEC §11): after a mitigation, manual or automatic, Breakwater
 * sends synthetic requests through the affected route and reads real traffic's error rate;
 * it records detection, mitigation and restoration times per incident (GET /v1/incidents,
 * GET /v1/state), observes `breakwater_time_to_restore_seconds`, and notifies "restoration
 * verified" (PagerDuty resolve) — or, when the mitigation did not bring service back,
 * "restoration failed", never "restored".
 */
import t, { type Test } from 'tap'
import { startApp, type App } from './helpers/app.js'
import { startTestSidecar, type TestSidecar } from './helpers/sidecar.js'
import { startReceiver, type Receiver } from './helpers/receiver.js'
import { admin } from './helpers/admin.js'
import { send, sleep, eventually } from './helpers/http.js'
import { metricValue, scrape, sumOf } from './helpers/metrics.js'
import { traffic, type Traffic } from './helpers/traffic.js'

t.setTimeout(120_000)

interface Fixture {
  app: App
  pay: App
  hook: Receiver
  s: TestSidecar
  load: Traffic
}

/**
 * The shop: `checkout` (kill switch `newCheckout`) and `catalog` on its own app, `pay` on a
 * payment dependency; notifications to a generic webhook receiver.
 */
async function fixture (t: Test, verification: Record<string, unknown>, extra: Record<string, unknown> = {}, notifications: Record<string, unknown> = {}): Promise<Fixture> {
  const app = await startApp(t)
  const pay = await startApp(t)
  const hook = await startReceiver([200])
  t.teardown(hook.close)
  const s = await startTestSidecar(t, {
    service: 'shop',
    version: '2.0.1',
    upstreams: { app: { url: app.url, critical: true }, pay: { url: pay.url } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'newCheckout' },
      { name: 'pay', match: { pathPrefix: '/pay' }, upstream: 'pay' },
      { name: 'catalog', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { newCheckout: true, unrelated: true },
    notifications: { webhooks: [`${hook.url}/events`], ...notifications },
    verification: { intervalMs: 150, successes: 2, windowMs: '2s', timeoutMs: '15s', ...verification },
    logging: { level: 'info', accessLog: false },
    ...extra
  })
  const load = traffic(s.proxy)
  t.teardown(load.close)
  return { app, pay, hook, s, load }
}

async function incidents (s: TestSidecar): Promise<any[]> {
  const r = await admin(s.admin, 'GET', '/v1/incidents')
  if (r.status !== 200) throw new Error(`GET /v1/incidents: ${r.status} ${JSON.stringify(r.body)}`)
  return r.body.incidents as any[]
}

/** Wait until the newest incident leaves `detected`/`verifying`; returns it. */
async function settled (s: TestSidecar, timeoutMs: number): Promise<any> {
  let last: any
  await eventually(async () => {
    last = (await incidents(s))[0]
    return last !== undefined && last.status !== 'verifying' && last.status !== 'detected'
  }, timeoutMs, 100)
  return last
}

async function mitigate (s: TestSidecar, body: Record<string, unknown>): Promise<any> {
  const r = await admin(s.admin, 'POST', '/v1/mitigations', body)
  if (r.status !== 200 && r.status !== 201) throw new Error(`POST /v1/mitigations: ${r.status} ${JSON.stringify(r.body)}`)
  return r.body
}

/** Real users on `path` until the returned function is called (and awaited). */
function users (load: Traffic, path: string): () => Promise<void> {
  let flowing = true
  const run = (async () => { while (flowing) { await load.burst(path, 3); await sleep(100) } })()
  return async () => { flowing = false; await run }
}

function events (hook: Receiver, kind: string): any[] {
  return hook.deliveries.filter((d) => d.url === '/events' && d.body?.event === kind).map((d) => d.body)
}

/** The common shape of a settled incident's timeline. */
function checkTimeline (t: Test, i: any): void {
  const detected = Date.parse(i.detectedAt)
  const mitigated = Date.parse(i.mitigatedAt)
  t.ok(Number.isFinite(detected) && Number.isFinite(mitigated), 'detection and mitigation times recorded')
  t.ok(mitigated >= detected, 'mitigated at or after detection')
  t.equal(i.timeToMitigateSeconds, Math.round(mitigated - detected) / 1000, 'time to mitigate = mitigatedAt − detectedAt')
}

t.test('a kill switch that stops the failures: restored — synthetics pass, TTR recorded, metric, "restoration verified"', async (t) => {
  const { app, hook, s, load } = await fixture(t, {
    synthetics: [{ route: 'checkout', path: '/checkout/probe' }, { route: 'catalog', path: '/catalog/probe' }]
  })
  app.failing.add('/checkout')
  const before = await load.burst('/checkout/cart', 20)
  t.ok(before.every((c) => c === 500), 'checkout is failing')
  t.equal(await metricValue(s.ops, 'breakwater_time_to_restore_seconds_count'), 0)

  const record = await mitigate(s, { action: 'killSwitch', flags: ['newCheckout'], reason: 'checkout errors after 2.0.1' })
  const stop = users(load, '/catalog/items')
  t.teardown(stop)
  const i = await settled(s, 10_000)
  await stop()
  t.equal(i?.status, 'restored', 'the incident is restored')
  t.equal(i.trigger, null, "an operator's incident")
  t.match(i.mitigation, { id: record.id, action: 'killSwitch' })
  checkTimeline(t, i)
  const restoredAt = Date.parse(i.restoredAt)
  t.ok(restoredAt >= Date.parse(i.mitigatedAt), 'restored after the mitigation')
  t.type(i.timeToRestoreSeconds, 'number')
  t.ok(Math.abs(i.timeToRestoreSeconds - (restoredAt - Date.parse(i.detectedAt)) / 1000) < 0.01, 'time to restore = restoredAt − detectedAt')
  t.ok(i.checks.syntheticRounds >= 2, `${String(i.checks.syntheticRounds)} synthetic rounds`)
  t.ok(i.checks.syntheticPassesInARow >= 2, 'two passing rounds in a row (verification.successes)')
  t.same(i.checks.lastSynthetic, [{ path: '/catalog/probe', status: 200, expected: 200 }], 'the synthetic of the killed route is skipped (it would measure the mitigation)')
  const probes = app.received.filter((r) => r.url === '/catalog/probe')
  t.ok(probes.length >= 2, 'the synthetics went through the proxy to the app')
  t.equal(probes[0]?.headers['x-breakwater-synthetic'], i.id, 'marked with the incident')
  t.equal(app.received.filter((r) => r.url === '/checkout/probe').length, 0)

  const state = await admin(s.admin, 'GET', '/v1/state')
  t.match(state.body.incidents, [{ id: i.id, status: 'restored', timeToRestoreSeconds: i.timeToRestoreSeconds }], 'the timeline is in GET /v1/state too')

  const samples = await scrape(s.ops)
  t.equal(sumOf(samples, 'breakwater_time_to_restore_seconds_count'), 1, 'one time to restore observed')
  t.equal(sumOf(samples, 'breakwater_time_to_restore_seconds_bucket', { le: '+Inf' }), 1)
  t.ok(Math.abs(sumOf(samples, 'breakwater_time_to_restore_seconds_sum') - i.timeToRestoreSeconds) < 0.01, 'sum = the incident\'s time to restore')
  t.equal(sumOf(samples, 'breakwater_time_to_restore_seconds_bucket', { le: '10' }), 1, 'in the 10 s bucket')

  t.ok(await eventually(() => events(hook, 'restoration_verified').length === 1, 5000), '"restoration verified" is sent')
  const verified = events(hook, 'restoration_verified')[0]
  t.match(verified, { service: 'shop', version: '2.0.1', trigger: null, details: { incident: i.id, timeToRestoreSeconds: i.timeToRestoreSeconds } })
  t.match(verified.summary, /restored/)
  await sleep(300)
  t.equal(events(hook, 'restoration_verified').length, 1, 'once')
  t.equal(events(hook, 'restoration_failed').length, 0)
  t.ok(s.logs.some((l) => l.event === 'incident' && l.phase === 'restored' && l.incident === i.id), 'logged')
})

t.test('an automatic circuit break on a failing dependency: restored; PagerDuty trigger, then resolve with the same dedup_key', async (t) => {
  const pd = await startReceiver([202])
  t.teardown(pd.close)
  const { pay, s, load } = await fixture(t, {
    synthetics: [{ route: 'catalog', path: '/catalog/probe' }]
  }, {
    rollbackTriggers: [{ name: 'pay_errors', metric: 'error_rate', threshold: 0.5, window: '2s', minRequests: 5, upstream: 'pay', action: 'circuitBreak' }]
  }, { pagerDutyServiceId: 'PSHOP01', pagerDutyRoutingKey: 'routing-key-shop', pagerDutyUrl: `${pd.url}/v2/enqueue` })
  pay.failing.add('/')
  const statuses = await load.burst('/pay/charge', 10)
  t.ok(statuses.every((c) => c === 500), 'pay is failing')
  const stop = users(load, '/catalog/items')
  t.teardown(stop)
  s.sidecar.triggers.evaluate()
  t.ok(await eventually(async () => (await incidents(s)).length === 1, 3000), 'the trigger opened an incident (detection)')
  const i = await settled(s, 10_000)
  await stop()
  t.equal(i?.status, 'restored')
  t.equal(i.trigger, 'pay_errors')
  t.match(i.scope, { upstream: 'pay' })
  t.equal(i.mitigation?.action, 'circuitBreak')
  checkTimeline(t, i)
  t.ok(i.timeToRestoreSeconds >= i.timeToMitigateSeconds, 'restored after mitigated')
  const state = await admin(s.admin, 'GET', '/v1/state')
  t.equal(state.body.circuits.pay.forced, 'open', 'the circuit was forced open by the trigger')
  t.equal((await send(s.proxy, '/pay/charge')).json().error, 'circuit_open')
  t.equal(await metricValue(s.ops, 'breakwater_time_to_restore_seconds_count'), 1)

  t.ok(await eventually(() => pd.deliveries.length >= 2, 5000), 'two PagerDuty events')
  const [trigger, resolve] = pd.deliveries.map((d) => d.body)
  t.match(trigger, { routing_key: 'routing-key-shop', event_action: 'trigger' })
  t.match(resolve, { routing_key: 'routing-key-shop', event_action: 'resolve', payload: { summary: /restored/ } })
  t.equal(resolve?.dedup_key, trigger?.dedup_key, 'resolve closes the incident the trigger opened')
  t.equal(pd.deliveries.length, 2)
})

t.test('a mitigation that does not fix anything: not restored — synthetics keep failing, "restoration failed", no TTR', async (t) => {
  const { app, hook, s, load } = await fixture(t, {
    synthetics: [{ route: 'checkout', path: '/checkout/probe' }],
    timeoutMs: '2s'
  })
  app.failing.add('/checkout')
  await load.burst('/checkout/cart', 20)
  // The wrong flag: checkout keeps failing.
  const record = await mitigate(s, { action: 'killSwitch', flags: ['unrelated'], reason: 'wrong guess' })
  t.equal((await incidents(s))[0]?.status, 'verifying', 'verifying at first')
  const i = await settled(s, 8000)
  t.equal(i?.status, 'not_restored', 'reported as not restored')
  t.match(i.mitigation, { id: record.id, action: 'killSwitch' })
  checkTimeline(t, i)
  t.equal(i.restoredAt, null, 'no restoration time')
  t.equal(i.timeToRestoreSeconds, null)
  t.ok(i.checks.syntheticRounds >= 2, `${String(i.checks.syntheticRounds)} synthetic rounds were tried`)
  t.equal(i.checks.syntheticPassesInARow, 0)
  t.same(i.checks.lastSynthetic, [{ path: '/checkout/probe', status: 500, expected: 200 }], 'the evidence: the synthetic still gets 500')
  t.ok(Date.now() - Date.parse(i.mitigatedAt) >= 1900, 'given up only after verification.timeoutMs')

  t.equal(await metricValue(s.ops, 'breakwater_time_to_restore_seconds_count'), 0, 'no time to restore observed')
  t.ok(await eventually(() => events(hook, 'restoration_failed').length === 1, 5000), '"restoration failed" is sent')
  t.match(events(hook, 'restoration_failed')[0], { details: { incident: i.id, restoredAt: null, timeToRestoreSeconds: null } })
  t.match(events(hook, 'restoration_failed')[0].summary, /NOT restored/)
  await sleep(500)
  t.equal(events(hook, 'restoration_verified').length, 0, 'never "restoration verified"')
  t.ok(s.logs.some((l) => l.event === 'incident' && l.phase === 'not_restored'), 'logged as not restored')
  t.notOk(s.logs.some((l) => l.event === 'incident' && l.phase === 'restored'))
  const state = await admin(s.admin, 'GET', '/v1/state')
  t.match(state.body.incidents, [{ id: i.id, status: 'not_restored' }])
})

t.test('synthetics pass but real traffic keeps failing: not restored', async (t) => {
  const { app, hook, s, load } = await fixture(t, {
    synthetics: [{ route: 'catalog', path: '/catalog/probe' }],
    timeoutMs: '3s'
  })
  app.failing.add('/checkout')
  await load.burst('/checkout/cart', 20)
  await mitigate(s, { action: 'killSwitch', flags: ['unrelated'], reason: 'wrong guess' })
  let flowing = true
  const real = (async () => {
    while (flowing) {
      await Promise.all([load.burst('/checkout/cart', 4), load.burst('/catalog/items', 4)])
      await sleep(100)
    }
  })()
  const i = await settled(s, 10_000)
  flowing = false
  await real
  t.equal(i?.status, 'not_restored', `real traffic still failing outweighs passing synthetics (settled ${String(i?.status)} ${((Date.parse(i?.restoredAt ?? i?.mitigatedAt) - Date.parse(i?.mitigatedAt)) / 1000).toFixed(2)} s after the mitigation, with checks ${JSON.stringify(i?.checks)})`)
  t.ok(i.checks.syntheticPassesInARow >= 2, 'the synthetics did pass')
  t.ok(i.checks.errorRate > 0.05, `the evidence: real traffic at ${String(i.checks.errorRate)} errors`)
  t.ok(i.checks.requests >= 10)
  t.equal(i.timeToRestoreSeconds, null)
  t.ok(await eventually(() => events(hook, 'restoration_failed').length === 1, 5000))
  t.equal(events(hook, 'restoration_verified').length, 0)
  t.equal(await metricValue(s.ops, 'breakwater_time_to_restore_seconds_count'), 0)
})

t.test('manual mitigations by the commands triage recommends are verified too', async (t) => {
  t.test('breakwater kill FLAG (PUT /v1/flags/FLAG)', async (t) => {
    const { app, hook, s, load } = await fixture(t, {
      synthetics: [{ route: 'checkout', path: '/checkout/probe' }, { route: 'catalog', path: '/catalog/probe' }]
    })
    app.failing.add('/checkout')
    await load.burst('/checkout/cart', 20)
    const put = await admin(s.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'checkout errors after 2.0.1' })
    t.equal(put.status, 200)
    const stop = users(load, '/catalog/items')
    t.teardown(stop)
    if (!t.ok(await eventually(async () => (await incidents(s)).length > 0, 3000), 'an incident is opened and verified for the kill')) return
    const i = await settled(s, 8000)
    await stop()
    t.equal(i?.status, 'restored')
    t.ok(await eventually(() => events(hook, 'restoration_verified').length === 1, 3000), '"restoration verified" is sent')
  })

  t.test('breakwater circuit UPSTREAM open (PUT /v1/circuits/UPSTREAM)', async (t) => {
    const { pay, hook, s, load } = await fixture(t, {
      synthetics: [{ route: 'catalog', path: '/catalog/probe' }]
    })
    pay.failing.add('/')
    await load.burst('/pay/charge', 20)
    const put = await admin(s.admin, 'PUT', '/v1/circuits/pay', { state: 'open', reason: 'pay failing' })
    t.equal(put.status, 200)
    const stop = users(load, '/catalog/items')
    t.teardown(stop)
    if (!t.ok(await eventually(async () => (await incidents(s)).length > 0, 3000), 'an incident is opened and verified for the forced circuit')) return
    const i = await settled(s, 8000)
    await stop()
    t.equal(i?.status, 'restored')
    t.ok(await eventually(() => events(hook, 'restoration_verified').length === 1, 3000), '"restoration verified" is sent')
  })
})

t.test("a circuit break is not judged by a synthetic the open circuit itself refuses (as with a killed route's)", async (t) => {
  const { pay, s, load } = await fixture(t, {
    synthetics: [{ route: 'pay', path: '/pay/probe' }, { route: 'catalog', path: '/catalog/probe' }],
    timeoutMs: '4s'
  })
  pay.failing.add('/')
  await load.burst('/pay/charge', 20)
  await mitigate(s, { action: 'circuitBreak', upstreams: ['pay'], reason: 'pay failing' })
  const refused = await send(s.proxy, '/pay/probe')
  t.equal(refused.json().error, 'circuit_open', 'setup: the route is now refused by the mitigation')
  const stop = users(load, '/catalog/items')
  t.teardown(stop)
  const i = await settled(s, 10_000)
  await stop()
  t.equal(i?.status, 'restored', `restored, not ${String(i?.status)}: the pay synthetic measures the mitigation (lastSynthetic ${JSON.stringify(i?.checks.lastSynthetic)})`)
})

t.test('synthetics alone never restore: with no real traffic the incident ends unverified, its probes not counted as traffic', async (t) => {
  const { app, hook, s, load } = await fixture(t, {
    synthetics: [{ route: 'catalog', path: '/catalog/probe' }, { path: '/catalog/other-probe' }],
    timeoutMs: '3s'
  })
  app.failing.add('/checkout')
  await load.burst('/checkout/cart', 20)
  await mitigate(s, { action: 'killSwitch', flags: ['newCheckout'], reason: 'checkout errors' })
  // Nobody uses the service now: only the verifier's own probes reach it.
  const i = await settled(s, 15_000)
  t.equal(i?.status, 'unverified', `not restored on synthetics alone (checks ${JSON.stringify(i?.checks)})`)
  t.ok(i.checks.syntheticPassesInARow >= 2, 'the synthetics did pass')
  t.ok(i.checks.syntheticRequests >= 4, `the windows counted ${String(i.checks.syntheticRequests)} probes`)
  t.equal(i.checks.requests, 0, 'and none of them as real traffic')
  t.equal(i.checks.p99Ms, null, "nor their latency as real users' latency")
  t.equal(i.restoredAt, null)
  t.ok(app.received.filter((r) => r.url.endsWith('probe')).length >= 4, 'the probes did go through the proxy to the app')
  t.ok(await eventually(() => events(hook, 'restoration_failed').length === 1, 5000))
  t.match(events(hook, 'restoration_failed')[0].summary, /no real traffic/)
  t.equal(events(hook, 'restoration_verified').length, 0, 'never "restoration verified"')
  t.equal(await metricValue(s.ops, 'breakwater_time_to_restore_seconds_count'), 0)
})

t.test("a p99_latency incident is judged by what users waited, not by slow synthetics", async (t) => {
  // The probed path is slow (a health page that does real work); users are fast again once the
  // slow feature is killed. The probes' latencies in the window would be the p99 and keep the
  // incident "not restored" however fast users were served.
  const slow = await startApp(t, { delayMs: 800 })
  const probed = await startApp(t, { delayMs: 600 })
  const web = await startApp(t)
  const s = await startTestSidecar(t, {
    service: 'shop',
    version: '2.0.1',
    upstreams: { slow: { url: slow.url }, probed: { url: probed.url }, web: { url: web.url } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'slow', killSwitch: 'newCheckout' },
      { name: 'deep', match: { pathPrefix: '/deep' }, upstream: 'probed' },
      { name: 'catalog', match: { pathPrefix: '/' }, upstream: 'web' }
    ],
    featureFlags: { newCheckout: true },
    rollbackTriggers: [{ name: 'checkout_slow', metric: 'p99_latency', threshold: 300, window: '2s', minRequests: 5, route: 'checkout', action: 'killSwitch', flags: ['newCheckout'] }],
    verification: { intervalMs: 150, successes: 2, windowMs: '2s', timeoutMs: '5s', synthetics: [{ route: 'deep', path: '/deep/health' }] },
    logging: { level: 'info', accessLog: false }
  })
  const load = traffic(s.proxy)
  t.teardown(load.close)
  await load.burst('/checkout/cart', 8)
  s.sidecar.triggers.evaluate()
  t.ok(await eventually(async () => (await incidents(s))[0]?.status === 'verifying', 5000), 'the trigger killed checkout and verification started')
  const stop = users(load, '/catalog/items')
  t.teardown(stop)
  const i = await settled(s, 15_000)
  await stop()
  t.equal(i?.trigger, 'checkout_slow')
  t.ok(i.checks.syntheticRequests >= 1, `the windows counted ${String(i.checks.syntheticRequests)} slow probes`)
  t.equal(i?.status, 'restored', `users are served fast: restored (checks ${JSON.stringify(i?.checks)})`)
  t.ok(i.checks.p99Ms < 300, `the p99 is the users' (${String(i.checks.p99Ms)} ms), not the probes' 600 ms`)
})

t.test("two incidents at once: neither counts the other's probes as real traffic", async (t) => {
  // Both verify at the same time, on routes both cover: each incident's probes were subtracted
  // from its own figures only, so each read the other's as real users and was "restored".
  const { hook, s } = await fixture(t, {
    synthetics: [{ path: '/catalog/probe' }],
    timeoutMs: '3s'
  }, { featureFlags: { newCheckout: true, unrelated: true, other: true } })
  await admin(s.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'first' })
  await admin(s.admin, 'PUT', '/v1/flags/other', { enabled: false, reason: 'second' })
  let both: any[] = []
  await eventually(async () => {
    both = (await incidents(s)).slice(0, 2)
    return both.length === 2 && both.every((i) => i.status !== 'verifying' && i.status !== 'detected')
  }, 15_000, 100)
  t.equal(both.length, 2, 'two incidents')
  for (const i of both) {
    t.equal(i.status, 'unverified', `${String(i.id)}: unverified, not restored (checks ${JSON.stringify(i.checks)})`)
    t.equal(i.checks.requests, 0, `${String(i.id)}: no real traffic`)
    t.ok(i.checks.syntheticRequests >= 2, `${String(i.id)}: the probes were counted as probes (${String(i.checks.syntheticRequests)})`)
  }
  t.equal(events(hook, 'restoration_verified').length, 0, 'never "restoration verified"')
})

t.test('a client cannot pass its requests off as synthetic: a forged marker still counts as real traffic', async (t) => {
  const { app, s, load } = await fixture(t, {
    synthetics: [{ route: 'catalog', path: '/catalog/probe' }],
    timeoutMs: '10s'
  })
  app.failing.add('/catalog/items')
  await load.burst('/checkout/cart', 5)
  await mitigate(s, { action: 'killSwitch', flags: ['unrelated'], reason: 'wrong guess' })
  const forged = { 'x-breakwater-synthetic': (await incidents(s))[0]?.id as string, 'user-agent': 'breakwater-verify' }
  let flowing = true
  const real = (async () => {
    while (flowing) {
      await Promise.all(Array.from({ length: 4 }, async () => await send(s.proxy, '/catalog/items', { headers: forged })))
      await sleep(100)
    }
  })()
  t.teardown(async () => { flowing = false; await real })
  const i = await settled(s, 20_000)
  flowing = false
  await real
  t.equal(i?.status, 'not_restored', `the failing "synthetic-looking" requests are real traffic and keep the incident open (checks ${JSON.stringify(i?.checks)})`)
  t.ok(i.checks.requests >= 10, `${String(i.checks.requests)} real requests counted`)
  t.ok(i.checks.errorRate > 0.5, 'with their errors')
})
