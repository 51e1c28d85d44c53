/**
 * Triage (SPEC §11; GET /v1/triage, `breakwater triage`): the signals the sidecar holds —
 * error rate and p99 per route and upstream over the last minute against the 30 minutes before,
 * circuit states, version/config/flag changes in the last 30 minutes, request rate against its
 * baseline — mapped to the decision matrix, with the evidence, the exact command and what was
 * ruled out. Every scenario but the traffic spike is produced by real traffic through a real
 * sidecar; the spike needs 30 minutes of baseline, which is written into the per-second
 * windows as setup.
 */
import t, { type Test } from 'tap'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { startApp, splitCommand, type App } from './helpers/app.js'
import { startTestSidecar, testSidecarInput, TEST_TOKEN, type TestSidecar } from './helpers/sidecar.js'
import { startReceiver, type Receiver } from './helpers/receiver.js'
import { startProcess, withoutTapHooks } from './helpers/process.js'
import { operator, adminUrl, parseOnlyJson, STACK_FRAME } from './helpers/operator.js'
import { admin } from './helpers/admin.js'
import { metricValue } from './helpers/metrics.js'
import { send, eventually } from './helpers/http.js'
import { traffic, type Traffic } from './helpers/traffic.js'
import { createPki } from './helpers/certificates.js'
import { resolveConfig } from '../src/config/load.js'
import { configHash } from '../src/control/control-plane.js'
import { windowNowMs } from '../src/proxy/window.js'

t.setTimeout(120_000)

const MATRIX = ['traffic_spike', 'feature_regression', 'downstream_failure', 'bad_deployment'] as const

/** `pay`'s route timeout: long enough that a busy machine stalling this process never times out a healthy payment. */
const PAY_TIMEOUT_MS = 5000

/**
 * The shop: its own app (critical) behind `checkout` (kill switch `newCheckout`) and `catalog`,
 * and a payment dependency behind `pay`.
 */
function shop (app: App, pay: App, cd: Receiver, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    service: 'shop',
    version: '2.0.1',
    upstreams: { app: { url: app.url, critical: true }, pay: { url: pay.url } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'newCheckout' },
      { name: 'pay', match: { pathPrefix: '/pay' }, upstream: 'pay', timeoutMs: PAY_TIMEOUT_MS },
      { name: 'catalog', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { newCheckout: true, unrelated: true },
    rollback: { type: 'webhook', url: `${cd.url}/rollback` },
    logging: { level: 'info', accessLog: false },
    ...extra
  }
}

interface Fixture {
  app: App
  pay: App
  cd: Receiver
  s: TestSidecar
  load: Traffic
}

async function fixture (t: Test, extra: Record<string, unknown> = {}, options: { stateDir?: (input: Record<string, unknown>) => string, input?: (input: Record<string, unknown>) => Record<string, unknown> } = {}): Promise<Fixture> {
  const app = await startApp(t)
  const pay = await startApp(t)
  const cd = await startReceiver([200])
  t.teardown(cd.close)
  let input = shop(app, pay, cd, extra)
  if (options.input !== undefined) input = options.input(input)
  if (options.stateDir !== undefined) input = { ...input, stateDir: options.stateDir(input) }
  const s = await startTestSidecar(t, input)
  const load = traffic(s.proxy)
  t.teardown(load.close)
  return { app, pay, cd, s, load }
}

async function triageOf (s: TestSidecar): Promise<any> {
  const r = await admin(s.admin, 'GET', '/v1/triage')
  if (r.status !== 200) throw new Error(`GET /v1/triage: ${r.status} ${JSON.stringify(r.body)}`)
  return r.body
}

function signalOf (list: any[], name: string): any {
  return list.find((x) => x.name === name)
}

/** Every decision-matrix scenario other than `scenario` is in ruledOut, each with a reason. */
function checkRuledOut (t: Test, report: any, scenario: string): void {
  const listed = new Map<string, string>((report.ruledOut as any[]).map((r) => [r.scenario, r.why]))
  t.notOk(listed.has(scenario), `ruledOut does not list the chosen scenario ${scenario}`)
  const missing = MATRIX.filter((x) => x !== scenario && !listed.has(x))
  t.same(missing, [], `ruledOut names every other scenario of the matrix (${scenario}: has ${[...listed.keys()].join(', ') || 'none'})`)
  for (const [name, why] of listed) t.ok(typeof why === 'string' && why.length > 0, `ruled out ${name} with a reason`)
}

/** Run the command triage recommends, as printed, with the real binary against this sidecar. */
async function runRecommended (t: Test, s: TestSidecar, command: string): Promise<{ code: number | null, stdout: string, stderr: string }> {
  const argv = splitCommand(command)
  t.equal(argv[0], 'breakwater', 'the command is a breakwater command')
  const run = operator(t)
  return await run([...argv.slice(1), '--admin', s.admin], { BREAKWATER_ADMIN_TOKEN: TEST_TOKEN })
}

/** Write `perSecond` requests at `latencyMs` into each second of a route's 30-minute baseline. */
function writeBaseline (s: TestSidecar, route: string, perSecond: number, latencyMs: number): number {
  const stats = [...s.sidecar.dataPlane.stats.allRoutes()].find((x) => x.route === route)
  if (stats === undefined) throw new Error(`no stats for route ${route}`)
  const now = windowNowMs()
  let n = 0
  // Seconds 70 to 1849 ago: inside the baseline (61–1860 s ago) with room for the clock to move.
  for (let k = 70; k < 1850; k++) {
    for (let i = 0; i < perSecond; i++) { stats.window.record(now - k * 1000, false, latencyMs); n++ }
  }
  return n
}

t.test('GET /v1/triage needs the admin token', async (t) => {
  const { s } = await fixture(t)
  t.equal((await admin(s.admin, 'GET', '/v1/triage', undefined, null)).status, 401)
  t.equal((await admin(s.admin, 'GET', '/v1/triage', undefined, 'wrong-token-wrong-token')).status, 401)
  t.equal((await admin(s.admin, 'GET', '/v1/triage')).status, 200)
})

t.test('healthy: traffic without errors → no scenario, nothing to do', async (t) => {
  const { s, load } = await fixture(t)
  await load.burst('/checkout/cart', 20)
  await load.burst('/catalog/items', 30)
  await load.burst('/pay/charge', 10)
  const r = await triageOf(s)
  t.equal(r.scenario, 'healthy')
  t.match(r.recommendation, { action: 'none', target: null, command: null })
  t.equal(r.evidence.all.current.requests, 60, 'evidence: every request of the last minute')
  t.equal(r.evidence.all.current.errorRate, 0)
  t.equal(r.evidence.all.baseline.requests, 0, 'a fresh sidecar has no baseline')
  t.equal(signalOf(r.evidence.routes, 'checkout').current.requests, 20)
  t.equal(signalOf(r.evidence.routes, 'catalog').current.requests, 30)
  t.equal(signalOf(r.evidence.upstreams, 'app').current.requests, 50)
  t.equal(signalOf(r.evidence.upstreams, 'pay').current.requests, 10)
  t.notOk([...r.evidence.routes, ...r.evidence.upstreams].some((x: any) => x.elevated), 'nothing is elevated')
  t.type(r.evidence.recentChanges.version, 'string', 'the version first seen at start counts as a recent change')
  t.match(r.summary, /no route or upstream has elevated errors/)
  checkRuledOut(t, r, 'healthy')
})

t.test('feature regression: errors on the kill-switch route only → kill that flag', async (t) => {
  const { app, s, load } = await fixture(t)
  app.failing.add('/checkout')
  const checkout = await load.burst('/checkout/cart', 20)
  const catalog = await load.burst('/catalog/items', 40)
  const pay = await load.burst('/pay/charge', 10)
  t.ok(checkout.every((c) => c === 500) && catalog.every((c) => c === 200) && pay.every((c) => c === 200), `the traffic: checkout fails, the rest works (${checkout.join(',')} / ${catalog.join(',')} / ${pay.join(',')})`)

  const r = await triageOf(s)
  t.equal(r.scenario, 'feature_regression')
  t.equal(r.recommendation.action, 'killSwitch')
  t.equal(r.recommendation.target, 'newCheckout')
  t.match(r.recommendation.command, /^breakwater kill newCheckout --reason "[^"]+"$/, 'the exact CLI command')
  t.match(r.summary, /checkout/)
  t.match(r.summary, /newCheckout/)
  const route = signalOf(r.evidence.routes, 'checkout')
  t.match(route, { elevated: true, current: { requests: 20, errorRate: 1 }, baseline: { requests: 0 } }, 'evidence: checkout at 100 % errors')
  t.match(signalOf(r.evidence.routes, 'catalog'), { elevated: false, current: { requests: 40, errorRate: 0 } })
  t.match(signalOf(r.evidence.routes, 'pay'), { elevated: false, current: { requests: 10, errorRate: 0 } })
  t.equal(r.evidence.all.current.requests, 70)
  t.equal(r.evidence.all.current.errorRate, 0.2857)
  checkRuledOut(t, r, 'feature_regression')

  // The command works as printed: checkout is switched off, the rest keeps working.
  const ran = await runRecommended(t, s, r.recommendation.command)
  t.equal(ran.code, 0, ran.stderr)
  const refused = await send(s.proxy, '/checkout/cart')
  t.equal(refused.status, 503)
  t.equal(refused.json().error, 'feature_disabled')
  t.equal((await send(s.proxy, '/catalog/items')).status, 200)
  const after = await triageOf(s)
  t.not(after.recommendation.action, 'killSwitch', 'triage does not recommend the kill switch that is already off')
  // The errors left in the last minute are checkout's, from before the kill switch stopped them:
  // one route, already mitigated — not "errors across routes".
  t.not(after.scenario, 'bad_deployment', `after the kill switch, errors of the one killed route are not called a bad deployment (${String(after.summary)})`)
  t.not(after.recommendation.action, 'rollback', 'and triage does not escalate to a rollback')
  t.match(after.evidence.recentChanges.flags, [{ flag: 'newCheckout', enabled: false }], 'the flag change is in the evidence')
})

t.test('after a kill switch, the errors its route left are not the upstream\'s: no circuit break or "investigate" on top', async (t) => {
  // pay's route has a kill switch of its own (a new payment flow): its errors are the feature's.
  const { app, pay, s, load } = await fixture(t, {}, {
    input: (input) => ({
      ...input,
      routes: (input.routes as any[]).map((r) => r.name === 'pay' ? { ...r, killSwitch: 'newPay' } : r),
      featureFlags: { ...(input.featureFlags as Record<string, boolean>), newPay: true }
    })
  })
  pay.failing.add('/')
  app.failing.add('/checkout')
  t.ok((await load.burst('/pay/charge', 20)).every((c) => c === 500), 'the new payment flow fails')
  t.ok((await load.burst('/checkout/cart', 20)).every((c) => c === 500), 'and so does the new checkout')
  await load.burst('/catalog/items', 40)
  t.equal((await admin(s.admin, 'PUT', '/v1/flags/newPay', { enabled: false, reason: 'payment errors' })).status, 200)
  t.equal((await admin(s.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'checkout errors' })).status, 200)
  t.ok((await load.burst('/pay/charge', 10)).every((c) => c === 503), 'pay is switched off')
  await load.burst('/catalog/items', 20)

  const r = await triageOf(s)
  t.equal(r.scenario, 'healthy', `both failing routes are switched off: nothing else fails (${String(r.scenario)}: ${String(r.summary)})`)
  t.match(r.recommendation, { action: 'none', command: null })
  t.match(signalOf(r.evidence.upstreams, 'pay'), { elevated: true }, 'the evidence still shows the errors of the last minute')
})

t.test('downstream failure: one dependency failing, the app fine → open its circuit', async (t) => {
  const { pay, s, load } = await fixture(t, { circuitBreakers: { pay: { volumeThreshold: 5, recoveryTimeout: 60_000 } } })
  pay.failing.add('/')
  const paid = await load.burst('/pay/charge', 5)
  t.ok(paid.every((c) => c === 500), 'pay answers 500')
  t.ok(await eventually(async () => (await send(s.proxy, '/pay/charge')).status === 503, 15_000), 'its breaker opened on the failures')
  await load.burst('/pay/charge', 14)
  await load.burst('/catalog/items', 40)
  await load.burst('/checkout/cart', 20)

  const r = await triageOf(s)
  t.equal(r.scenario, 'downstream_failure')
  t.equal(r.recommendation.action, 'circuitBreak')
  t.equal(r.recommendation.target, 'pay')
  t.match(r.recommendation.command, /^breakwater circuit pay open --reason "[^"]+"$/, 'the exact CLI command')
  t.match(r.summary, /pay/)
  t.match(signalOf(r.evidence.upstreams, 'pay'), { elevated: true, current: { errorRate: 1 } }, 'evidence: pay failing (5xx and refusals by the circuit failures opened)')
  t.ok(signalOf(r.evidence.upstreams, 'pay').current.requests >= 19)
  t.match(signalOf(r.evidence.upstreams, 'app'), { elevated: false, current: { requests: 60, errorRate: 0 } }, 'the app is fine')
  t.match(r.evidence.circuits, [{ upstream: 'pay', state: 'open', forced: null }], 'evidence: the circuit state')
  checkRuledOut(t, r, 'downstream_failure')
  t.match((r.ruledOut as any[]).find((x) => x.scenario === 'feature_regression')?.why, /no kill switch/)

  const ran = await runRecommended(t, s, r.recommendation.command)
  t.equal(ran.code, 0, ran.stderr)
  const state = await admin(s.admin, 'GET', '/v1/state')
  t.equal(state.body.circuits.pay.forced, 'open', 'the circuit is forced open by the command')
  t.equal((await send(s.proxy, '/catalog/items')).status, 200)

  const after = await triageOf(s)
  t.not(after.recommendation.command, r.recommendation.command, 'triage does not recommend the mitigation in force again')
  t.equal(after.scenario, 'healthy', 'pay\'s errors are mitigated: nothing else fails')
  t.match((after.ruledOut as any[]).find((x) => x.scenario === 'downstream_failure')?.why, /pay are already forced open/)
})

t.test('an upstream forced open with a failover is not isolated: its route\'s errors from the failover still count', async (t) => {
  const dr = await startApp(t)
  const { pay, s, load } = await fixture(t, {}, {
    input: (input) => ({ ...input, upstreams: { ...(input.upstreams as Record<string, unknown>), pay: { url: (input.upstreams as any).pay.url, failover: 'payDr' }, payDr: { url: dr.url } } })
  })
  pay.failing.add('/')
  dr.failing.add('/')
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/pay', { state: 'open', reason: 'isolate pay' })).status, 200)
  const paid = await load.burst('/pay/charge', 20)
  t.ok(paid.every((c) => c === 500), `the failover answers for pay, and fails too (${paid.join(',')})`)
  await load.burst('/catalog/items', 40)
  const r = await triageOf(s)
  t.not(r.scenario, 'healthy', `errors on pay are not taken for mitigated (${String(r.scenario)}: ${String(r.summary)})`)
  t.match(signalOf(r.evidence.routes, 'pay'), { elevated: true, current: { errorRate: 1 } }, 'evidence: route pay failing')
  t.notMatch((r.ruledOut as any[]).find((x) => x.scenario === 'feature_regression')?.why ?? '', /already switched off or isolated/)
})

t.test('a dependency whose failover already serves its traffic is mitigated: no failover recommended again', async (t) => {
  const dr = await startApp(t)
  const { pay, s, load } = await fixture(t, { circuitBreakers: { pay: { volumeThreshold: 5, recoveryTimeout: 60_000 } } }, {
    input: (input) => ({ ...input, upstreams: { ...(input.upstreams as Record<string, unknown>), pay: { url: (input.upstreams as any).pay.url, failover: 'payDr' }, payDr: { url: dr.url } } })
  })
  pay.failing.add('/')
  const failed = await load.burst('/pay/charge', 5)
  t.ok(failed.every((c) => c === 500), 'pay answers 500 until its breaker opens')
  const before = await triageOf(s)
  t.equal(before.recommendation.action, 'failover', `before, triage recommends the failover (${String(before.recommendation.command)})`)
  const served = await load.burst('/pay/charge', 30)
  t.ok(served.every((c) => c === 200), `then the failover takes the traffic and serves it (${served.join(',')})`)
  await load.burst('/catalog/items', 40)

  const r = await triageOf(s)
  t.not(r.recommendation.action, 'failover', `triage does not recommend the failover in force (${String(r.recommendation.command)})`)
  t.equal(r.scenario, 'healthy', 'pay\'s errors are mitigated: nothing else fails')
  t.match((r.ruledOut as any[]).find((x) => x.scenario === 'downstream_failure')?.why, /pay → payDr/)

  dr.failing.add('/')
  const alsoFailing = await load.burst('/pay/charge', 20)
  t.ok(alsoFailing.every((c) => c === 500), 'the failover fails too')
  const worse = await triageOf(s)
  t.equal(worse.scenario, 'downstream_failure', 'a failover that fails too mitigates nothing')
  t.not(worse.recommendation.action, 'failover', 'and is not recommended')
  t.match(worse.recommendation.why, /already goes to payDr, which fails too/)
})

t.test('a failover whose every endpoint passive ejection took out is not recommended', async (t) => {
  // Two endpoints, both failing: each is ejected for a minute after two failures in a row.
  const dr1 = await startApp(t, { failing: ['/'] })
  const dr2 = await startApp(t, { failing: ['/'] })
  const { pay, s, load } = await fixture(t, { circuitBreakers: { pay: { volumeThreshold: 5, recoveryTimeout: 60_000 } } }, {
    input: (input) => ({
      ...input,
      upstreams: { ...(input.upstreams as Record<string, unknown>), pay: { url: (input.upstreams as any).pay.url, failover: 'payDr' }, payDr: { endpoints: [dr1.url, dr2.url], ejection: { consecutiveFailures: 2, baseMs: 60_000, maxMs: 60_000 } } },
      routes: [{ name: 'dr', match: { pathPrefix: '/dr' }, upstream: 'payDr' }, ...(input.routes as unknown[])]
    })
  })
  for (let i = 0; i < 20 && await metricValue(s.ops, 'breakwater_upstream_endpoints', { upstream: 'payDr', state: 'ejected' }) !== 2; i++) await load.burst('/dr/x', 2)
  t.equal(await metricValue(s.ops, 'breakwater_upstream_endpoints', { upstream: 'payDr', state: 'ejected' }), 2, 'setup: both of payDr\'s endpoints are ejected')
  pay.failing.add('/')
  const failed = await load.burst('/pay/charge', 5)
  t.ok(failed.every((c) => c === 500), 'pay answers 500 until its breaker opens')
  const r = await triageOf(s)
  t.not(r.recommendation.action, 'failover', `no failover to an upstream with no usable endpoint (${String(r.recommendation.command)})`)
  t.match(r.recommendation.why, /its failover payDr is not healthy either/)
})

t.test('a failover whose every endpoint fails its health check is not recommended, however idle it looks', async (t) => {
  const dr = await startApp(t, { failing: ['/'] })
  const { pay, s, load } = await fixture(t, { circuitBreakers: { pay: { volumeThreshold: 5, recoveryTimeout: 60_000 } } }, {
    input: (input) => ({ ...input, upstreams: { ...(input.upstreams as Record<string, unknown>), pay: { url: (input.upstreams as any).pay.url, failover: 'payDr' }, payDr: { url: dr.url, healthCheck: { path: '/healthz', intervalMs: 100, timeoutMs: 100, unhealthyThreshold: 1, healthyThreshold: 1 } } } })
  })
  t.ok(await eventually(async () => await metricValue(s.ops, 'breakwater_upstream_endpoints', { upstream: 'payDr', state: 'unhealthy' }) === 1, 20_000), 'setup: payDr\'s only endpoint fails its health check')
  pay.failing.add('/')
  const failed = await load.burst('/pay/charge', 5)
  t.ok(failed.every((c) => c === 500), 'pay answers 500 until its breaker opens')
  const r = await triageOf(s)
  t.equal(r.scenario, 'downstream_failure')
  t.not(r.recommendation.action, 'failover', `no failover to an upstream with no usable endpoint (${String(r.recommendation.command)})`)
  t.equal(r.recommendation.action, 'circuitBreak')
  t.match(r.recommendation.why, /its failover payDr is not healthy either/)
})

t.test('downstream failure: one dependency timing out → open its circuit; p99 in the evidence', async (t) => {
  const { pay, s, load } = await fixture(t)
  pay.hanging.add('/')
  const paid = await load.burst('/pay/charge', 12)
  t.ok(paid.every((c) => c === 504), 'pay times out (504 after the route timeoutMs)')
  await load.burst('/catalog/items', 30)
  const r = await triageOf(s)
  t.equal(r.scenario, 'downstream_failure')
  t.equal(r.recommendation.target, 'pay')
  t.match(r.recommendation.command, /^breakwater circuit pay open --reason /)
  const sig = signalOf(r.evidence.upstreams, 'pay')
  t.match(sig, { elevated: true, current: { requests: 12, errorRate: 1 } })
  t.ok(sig.current.p99Ms >= PAY_TIMEOUT_MS * 0.9, `evidence: p99 ${String(sig.current.p99Ms)} ms, at least about the ${PAY_TIMEOUT_MS} ms timeout`)
  checkRuledOut(t, r, 'downstream_failure')
})

t.test('downstream failure: one dependency far slower than its baseline, short of its timeout → open its circuit (not "healthy")', async (t) => {
  const { pay, s, load } = await fixture(t)
  // Thirty minutes of calm: pay answering in 5 ms; the app in 400 ms (a slow app by nature, so
  // that a busy machine slowing this burst of it is no rise).
  writeBaseline(s, 'pay', 1, 5)
  writeBaseline(s, 'catalog', 1, 400)
  pay.delayMs = 1000 // slow, well within its 5 s timeout: no error anywhere
  const paid = await load.burst('/pay/charge', 20)
  t.ok(paid.every((c) => c === 200), `pay answers, slowly (${paid.join(',')})`)
  await load.burst('/catalog/items', 40)

  const r = await triageOf(s)
  t.equal(r.scenario, 'downstream_failure', `${String(r.scenario)}: ${String(r.summary)}`)
  t.equal(r.recommendation.action, 'circuitBreak')
  t.equal(r.recommendation.target, 'pay')
  t.match(r.summary, /upstream pay is slow/)
  t.match(signalOf(r.evidence.upstreams, 'pay'), { slow: true, elevated: false, current: { errorRate: 0 } }, 'evidence: pay slow, not erroring')
  t.match(signalOf(r.evidence.upstreams, 'app'), { slow: false, elevated: false }, 'the app is fine')
  checkRuledOut(t, r, 'downstream_failure')

  // Once isolated, it is not recommended again.
  t.equal((await runRecommended(t, s, r.recommendation.command)).code, 0)
  const after = await triageOf(s)
  t.not(after.recommendation.command, r.recommendation.command, 'triage does not recommend the mitigation in force again')
})

t.test('bad deployment: a new version with errors across routes of its own app → rollback', async (t) => {
  const { app, cd, s, load } = await fixture(t)
  app.failing.add('/checkout')
  app.failing.add('/catalog')
  await load.burst('/checkout/cart', 20)
  await load.burst('/catalog/items', 20)
  await load.burst('/pay/charge', 20)
  const r = await triageOf(s)
  t.equal(r.scenario, 'bad_deployment')
  t.equal(r.recommendation.action, 'rollback')
  t.equal(r.recommendation.target, '2.0.1')
  t.match(r.recommendation.command, /^breakwater mitigate rollback --reason "[^"]+"$/, 'the exact CLI command')
  t.match(r.summary, /2\.0\.1/)
  t.type(r.evidence.recentChanges.version, 'string', 'evidence: the version change')
  t.ok(Date.now() - Date.parse(r.evidence.recentChanges.version) < 60_000)
  t.match(signalOf(r.evidence.routes, 'checkout'), { elevated: true, current: { errorRate: 1 } })
  t.match(signalOf(r.evidence.routes, 'catalog'), { elevated: true, current: { errorRate: 1 } })
  t.match(signalOf(r.evidence.upstreams, 'pay'), { elevated: false, current: { errorRate: 0 } })
  t.equal(r.evidence.all.current.errorRate, 0.6667)
  checkRuledOut(t, r, 'bad_deployment')
  t.match((r.ruledOut as any[]).find((x) => x.scenario === 'feature_regression')?.why, /spread across routes/)
  t.match((r.ruledOut as any[]).find((x) => x.scenario === 'downstream_failure')?.why, /app/)

  const ran = await runRecommended(t, s, r.recommendation.command)
  t.equal(ran.code, 0, ran.stderr)
  t.equal(cd.deliveries.length, 1, 'the rollback webhook was called once')
  t.match(cd.deliveries[0]?.body, { service: 'shop', version: '2.0.1', trigger: null })

  // The CD system has not deployed the previous version yet: the same errors, the same version.
  t.ok(await eventually(async () => (await admin(s.admin, 'GET', '/v1/state')).body.mitigations.some((m: any) => m.action === 'rollback' && m.status === 'succeeded')), 'the rollback succeeded')
  const after = await triageOf(s)
  t.not(after.recommendation.action, 'rollback', 'triage does not recommend a rollback the sidecar would refuse (409 already_rolled_back)')
  t.match((after.ruledOut as any[]).find((x) => x.scenario === 'bad_deployment')?.why, /a rollback would be refused now: version 2\.0\.1 was already rolled back at /)
})

t.test('a certificate rotated in place is not a config change: the config hash covers the TLS file paths, not what they hold', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-triage-hash-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const base = { service: 'svc', upstreams: { app: { url: 'http://127.0.0.1:1' } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }] }
  const ca = join(dir, 'ca.crt')
  const hashWith = (pem: string, path = ca): string => {
    writeFileSync(path, pem)
    return configHash(resolveConfig({ ...base, tracing: { otlpEndpoint: 'https://collector:4318', sampleRatio: 0.01, tls: { ca: path } } }, { env: {} }).config)
  }
  const first = hashWith(readFileSync(createPki(t, 'First CA').ca, 'utf8'))
  t.equal(hashWith(readFileSync(createPki(t, 'Second CA').ca, 'utf8')), first, 'tracing.tls.ca rotated at the same path: the same hash')
  t.not(hashWith(readFileSync(createPki(t, 'First CA').ca, 'utf8'), join(dir, 'other-ca.crt')), first, 'another path is a config change')
})

/** A stateDir where this version and config were first seen `since` (ISO): no recent change. */
function seenSince (t: Test, since: string): (input: Record<string, unknown>) => string {
  return (input) => {
    const dir = mkdtempSync(join(tmpdir(), 'breakwater-triage-'))
    t.teardown(() => rmSync(dir, { recursive: true, force: true }))
    const hash = configHash(resolveConfig(testSidecarInput(input, dir)).config)
    writeFileSync(join(dir, 'state.json'), JSON.stringify({ version: 1, overrides: {}, circuits: {}, mitigations: [], versions: { '2.0.1': since }, configs: { [hash]: since }, rolledBack: {} }))
    return dir
  }
}

t.test('the same errors on a version running for days are not called a bad deployment', async (t) => {
  const twoDaysAgo = new Date(Date.now() - 2 * 86_400_000).toISOString()
  const { app, s, load } = await fixture(t, {}, { stateDir: seenSince(t, twoDaysAgo) })
  const st = await admin(s.admin, 'GET', '/v1/state')
  t.equal(st.body.versionSince, twoDaysAgo, 'setup: the version was first seen two days ago')
  t.equal(st.body.configSince, twoDaysAgo, 'setup: so was the config')
  app.failing.add('/checkout')
  app.failing.add('/catalog')
  await load.burst('/checkout/cart', 20)
  await load.burst('/catalog/items', 20)
  const r = await triageOf(s)
  t.not(r.scenario, 'bad_deployment')
  t.not(r.recommendation.action, 'rollback')
  t.equal(r.evidence.recentChanges.version, null)
  t.equal(r.evidence.recentChanges.config, null)
  t.match((r.ruledOut as any[]).find((x) => x.scenario === 'bad_deployment')?.why, /no version or config change/)
})

t.test('the service\'s own app failing, with a healthy failover and no recent change → fail it over (never a circuit break)', async (t) => {
  const dr = await startApp(t)
  const { app, s, load } = await fixture(t, {}, {
    input: (input) => ({ ...input, upstreams: { ...(input.upstreams as Record<string, unknown>), app: { url: (input.upstreams as any).app.url, critical: true, failover: 'appDr' }, appDr: { url: dr.url } } }),
    stateDir: seenSince(t, new Date(Date.now() - 2 * 86_400_000).toISOString())
  })
  app.failing.add('/checkout')
  app.failing.add('/catalog')
  await load.burst('/checkout/cart', 20)
  await load.burst('/catalog/items', 20)
  const r = await triageOf(s)
  t.equal(r.scenario, 'downstream_failure', `${String(r.scenario)}: ${String(r.summary)}`)
  t.match(r.summary, /upstream app \(the service's own app\) is failing/)
  t.equal(r.recommendation.action, 'failover')
  t.match(r.recommendation.command, /^breakwater failover app --to appDr --reason /)

  // Its failover unusable: nothing to fail over to, and the own app is never circuit-broken.
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/appDr', { state: 'open', reason: 'the DR site is down' })).status, 200)
  const worse = await triageOf(s)
  t.not(worse.recommendation.action, 'failover', `${String(worse.recommendation.command)}`)
  t.not(worse.recommendation.action, 'circuitBreak')
  t.match((worse.ruledOut as any[]).find((x) => x.scenario === 'downstream_failure')?.why, /own app \(critical\), not a dependency, and has no healthy failover/)
})

t.test('traffic spike: rate far above the 30-minute baseline with latency up → scale or shed', async (t) => {
  const { app, s, load } = await fixture(t)
  app.delayMs = 60 // saturated: every answer slower
  for (let i = 0; i < 8; i++) await load.burst('/catalog/items', 50)
  // Thirty minutes of calm before it: 1 request a second at 5 ms.
  const baseline = writeBaseline(s, 'catalog', 1, 5)
  const r = await triageOf(s)
  t.equal(r.scenario, 'traffic_spike')
  t.equal(r.recommendation.action, 'scale')
  t.match(r.recommendation.command, /scale/)
  t.match(r.recommendation.command, /shop/, 'names the service')
  t.match(r.recommendation.why, /shed|capacity/)
  // Rung 5 when scaling isn't possible now: a rate limit on the busiest route, at twice its baseline.
  t.match(r.recommendation.alternative, { action: 'rateLimit', target: 'catalog', command: /^breakwater mitigate rateLimit --route catalog --rps 2 --ttl 30m --reason / })
  t.match(r.recommendation.alternative.why, /429/)
  const all = r.evidence.all
  t.equal(all.current.requests, 400)
  t.equal(all.baseline.requests, baseline)
  t.ok(all.current.ratePerSecond >= 3 * all.baseline.ratePerSecond, `evidence: ${String(all.current.ratePerSecond)}/s vs ${String(all.baseline.ratePerSecond)}/s`)
  t.ok(all.current.p99Ms >= 2 * all.baseline.p99Ms, `evidence: p99 ${String(all.current.p99Ms)} ms vs ${String(all.baseline.p99Ms)} ms`)
  t.match(r.summary, /baseline/)
  checkRuledOut(t, r, 'traffic_spike')

  // The shed applied as printed: the last minute still holds the spike, but the same rate limit
  // is not recommended again.
  t.equal((await runRecommended(t, s, r.recommendation.alternative.command)).code, 0)
  const after = await triageOf(s)
  t.not(after.recommendation.alternative?.command, r.recommendation.alternative.command, `the rate limit in force is not recommended again (${String(after.recommendation.alternative?.command)})`)
  t.not(after.recommendation.alternative?.target, 'catalog', 'nor any other limit on the route it limits')
})

t.test('more traffic alone, with latency and errors as usual, is not a spike', async (t) => {
  const { s, load } = await fixture(t)
  for (let i = 0; i < 8; i++) await load.burst('/catalog/items', 50)
  writeBaseline(s, 'catalog', 1, 400) // a slow baseline: today's fast answers are no worse
  const r = await triageOf(s)
  t.equal(r.scenario, 'healthy')
  t.match((r.ruledOut as any[]).find((x) => x.scenario === 'traffic_spike')?.why, /baseline/)
})

/** A dependency failing 100 % through real traffic, until its circuit opened on the failures. */
async function payFailingWithCircuitOpen (t: Test, f: Fixture, catalogRequests: number): Promise<void> {
  f.pay.failing.add('/')
  t.ok((await f.load.burst('/pay/charge', 5)).every((c) => c === 500), 'pay answers 500')
  t.ok(await eventually(async () => (await send(f.s.proxy, '/pay/charge')).status === 503, 15_000), 'its breaker opened on the failures')
  await f.load.burst('/pay/charge', 14)
  for (let sent = 0; sent < catalogRequests; sent += 50) await f.load.burst('/catalog/items', Math.min(50, catalogRequests - sent))
}

t.test('a failing dependency with its circuit open, against an almost idle baseline: not a "spike", open the circuit — never scale', async (t) => {
  const f = await fixture(t, { circuitBreakers: { pay: { volumeThreshold: 5, recoveryTimeout: 60_000 } } })
  await payFailingWithCircuitOpen(t, f, 60)
  // Thirty quiet minutes before it: one request every 4 s (0.25 req/s), so the last minute is ~5× that.
  const stats = [...f.s.sidecar.dataPlane.stats.allRoutes()].find((x) => x.route === 'catalog')
  const now = windowNowMs()
  for (let k = 70; k < 1850; k += 4) stats?.window.record(now - k * 1000, false, 5)
  const r = await triageOf(f.s)
  t.ok(r.evidence.all.current.ratePerSecond >= 3 * r.evidence.all.baseline.ratePerSecond, `setup: ${String(r.evidence.all.current.ratePerSecond)}/s is over 3× the baseline ${String(r.evidence.all.baseline.ratePerSecond)}/s`)
  t.equal(r.scenario, 'downstream_failure')
  t.equal(r.recommendation.action, 'circuitBreak')
  t.equal(r.recommendation.target, 'pay')
  t.match((r.ruledOut as any[]).find((x) => x.scenario === 'traffic_spike')?.why, /below 0\.5\/s/, 'no spike on a baseline below the minimum rate')
  t.notOk(JSON.stringify(r).includes('lower risk or more specific'))
})

t.test('when a spike and a failing dependency both fit, the ladder decides: circuit break ranks above scale', async (t) => {
  const f = await fixture(t, { circuitBreakers: { pay: { volumeThreshold: 5, recoveryTimeout: 60_000 } } })
  await payFailingWithCircuitOpen(t, f, 300)
  const baseline = writeBaseline(f.s, 'catalog', 1, 5)
  const r = await triageOf(f.s)
  t.equal(r.evidence.all.baseline.requests, baseline)
  t.equal(r.scenario, 'downstream_failure')
  t.equal(r.recommendation.action, 'circuitBreak')
  const spike = (r.ruledOut as any[]).find((x) => x.scenario === 'traffic_spike')
  t.match(spike?.why, /also fits, but circuitBreak ranks above scale on the mitigation ladder/, 'the spike fits too, and is passed over by the ladder')
})

t.test('breakwater triage against a sidecar process: --json and the human form', async (t) => {
  const TOKEN = 'triage-cli-test-token-0123456789'
  const app = await startApp(t, { failing: ['/checkout'] })
  const s = await startProcess(t, {
    service: 'shop',
    version: '2.0.1',
    upstreams: { app: { url: app.url, critical: true } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'newCheckout' },
      { name: 'catalog', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { newCheckout: true },
    logging: { level: 'info', accessLog: false },
    shutdown: { drainDelayMs: 0, timeoutMs: 2000 }
  }, { ...withoutTapHooks, BREAKWATER_ADMIN_TOKEN: TOKEN })
  const load = traffic(s.proxy)
  t.teardown(load.close)
  await load.burst('/checkout/cart', 30)
  await load.burst('/catalog/items', 30)
  const url = adminUrl(s)
  const run = operator(t)

  const env = { BREAKWATER_ADMIN_TOKEN: TOKEN }
  const [json, human] = await Promise.all([
    run(['triage', '--admin', url, '--json'], env),
    run(['triage', '--admin', url], env)
  ])

  t.equal(json.code, 0, json.stderr)
  const r = parseOnlyJson(json)
  t.equal(r.scenario, 'feature_regression')
  t.match(r.recommendation, { action: 'killSwitch', target: 'newCheckout' })
  t.match(r.recommendation.command, /^breakwater kill newCheckout --reason "[^"]+"$/)
  t.match(signalOf(r.evidence.routes, 'checkout'), { current: { requests: 30, errorRate: 1 }, elevated: true })
  t.ok(Array.isArray(r.ruledOut) && r.ruledOut.length > 0)

  t.equal(human.code, 0, human.stderr)
  const out = human.stdout
  t.throws(() => JSON.parse(out), 'the default output is for people')
  t.match(out, /SCENARIO\s+feature regression/)
  t.match(out, `$ ${String(r.recommendation.command)}`, 'the exact command, ready to paste')
  t.match(out, /EVIDENCE/)
  t.match(out, /route checkout\s.*100\.0%.*YES/, 'the failing route with its error rate, flagged')
  t.match(out, /route catalog\s.*0\.0%/)
  t.match(out, /CHANGES\s+version: \d{4}-/, 'the recent version change')
  t.match(out, /RULED OUT/)
  t.match(out, /traffic spike: /)
  t.notMatch(out, STACK_FRAME)

  // Paste the command: the feature goes off, the rest keeps working.
  const argv = splitCommand(r.recommendation.command as string)
  const ran = await run([...argv.slice(1), '--admin', url], env)
  t.equal(ran.code, 0, ran.stderr)
  t.equal((await send(s.proxy, '/checkout/cart')).status, 503)
  t.equal((await send(s.proxy, '/catalog/items')).status, 200)
})
