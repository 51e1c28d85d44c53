import t, { type Test } from 'tap'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { startUpstream, echo, refusedUrl, type TestUpstream } from './helpers/upstream.js'
import { startTestSidecar, testSidecarInput, type TestSidecar } from './helpers/sidecar.js'
import { startReceiver } from './helpers/receiver.js'
import { admin } from './helpers/admin.js'
import { send, sleep, eventually } from './helpers/http.js'
import { metricValue } from './helpers/metrics.js'
import { traffic, sustain, type Traffic } from './helpers/traffic.js'
import { resolveConfig } from '../src/config/load.js'
import { configHash } from '../src/control/control-plane.js'
import { idempotencyKey } from '../src/control/rollback.js'

/**
 * One upstream whose answer the path decides: `fail` → 500, `slow` → 200 after 300 ms,
 * `stall` → 200 after 3 s, `drip` → headers at once and the body 3 s later, `missing` → 404,
 * anything else → 200. (The p99 tests below put their threshold at 2 s, between the two: a
 * stall of the test process, which the sidecar shares, must last 2 s to push a fast request over.)
 */
async function app (t: Test): Promise<TestUpstream> {
  const up = await startUpstream((req, res, body) => {
    const url = req.url ?? '/'
    if (url.includes('fail')) { res.writeHead(500, { 'content-type': 'text/plain' }); res.end('upstream failed'); return }
    if (url.includes('missing')) { res.writeHead(404, { 'content-type': 'text/plain' }); res.end('not here'); return }
    if (url.includes('drip')) { res.writeHead(200, { 'content-type': 'text/plain' }); res.flushHeaders(); setTimeout(() => res.end('late body'), 3000); return }
    const wait = url.includes('stall') ? 3000 : url.includes('slow') ? 300 : 0
    if (wait === 0) { echo(req, res, body); return }
    setTimeout(() => { if (!res.destroyed) echo(req, res, body) }, wait)
  })
  t.teardown(up.close)
  return up
}

function load (t: Test, s: TestSidecar): Traffic {
  const l = traffic(s.proxy)
  t.teardown(l.close)
  return l
}

/** A sidecar with one route to `app` and one trigger, and its load. */
async function oneRoute (t: Test, ...triggers: Array<Record<string, unknown>>): Promise<{ s: TestSidecar, l: Traffic }> {
  const up = await app(t)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'api', match: { pathPrefix: '/' }, upstream: 'app' }],
    rollbackTriggers: triggers
  })
  return { s, l: load(t, s) }
}

async function triggerOf (s: TestSidecar, name: string): Promise<any> {
  const state = await admin(s.admin, 'GET', '/v1/state')
  return (state.body.triggers as any[]).find((x) => x.name === name)
}

function evaluate (s: TestSidecar): void {
  s.sidecar.triggers.evaluate()
}

function firedLines (s: TestSidecar, name: string): Array<Record<string, unknown>> {
  return s.logs.filter((l) => l.event === 'trigger_fired' && l.trigger === name)
}

async function auditEntries (s: TestSidecar): Promise<any[]> {
  return (await admin(s.admin, 'GET', '/v1/audit?limit=100')).body.entries as any[]
}

/**
 * A 5 s window: a burst on a busy machine can take a second or two from its first answer to its
 * last, and the evaluation that follows must still see all of it.
 */
const ERROR_WINDOW_MS = 5000
const errorTrigger = (extra: Record<string, unknown> = {}): Record<string, unknown> =>
  ({ name: 'errors', metric: 'error_rate', threshold: 0.5, window: `${ERROR_WINDOW_MS / 1000}s`, minRequests: 5, action: 'notify', ...extra })

t.test('a sustained 5xx burst fires the trigger exactly once; its rollback runs once, audited with the trigger as requester', async (t) => {
  const up = await app(t)
  const cd = await startReceiver([200])
  t.teardown(cd.close)
  const s = await startTestSidecar(t, {
    service: 'checkout',
    version: '2.4.1',
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'api', match: { pathPrefix: '/' }, upstream: 'app' }],
    rollbackTriggers: [errorTrigger({ action: 'rollback' })],
    rollback: { type: 'webhook', url: `${cd.url}/rollback` }
  })
  const l = load(t, s)
  // 3.5 s of nothing but 500s, evaluated every tick as well as by the sidecar's own 1 s timer.
  const statuses = await sustain(3500, 100, async () => {
    const out = await l.burst('/fail', 4)
    evaluate(s)
    return out
  })
  t.ok(statuses.length >= 60 && statuses.every((c) => c === 500), `the burst was ${statuses.length} upstream 500s`)
  t.ok(await eventually(() => cd.deliveries.length >= 1, 5000), 'the rollback webhook was called')
  await sleep(300)
  t.equal(firedLines(s, 'errors').length, 1, 'one trigger_fired line for the whole burst')
  t.equal(await metricValue(s.ops, 'breakwater_trigger_fired_total', { trigger: 'errors' }), 1)
  t.equal(await metricValue(s.ops, 'breakwater_trigger_value', { trigger: 'errors' }), 1, 'the gauge shows the current error ratio')
  t.equal(cd.deliveries.length, 1, 'one rollback for one incident')
  const d = cd.deliveries[0]
  t.match(d?.body, { service: 'checkout', version: '2.4.1', trigger: 'errors' })
  t.match(d?.body.reason, /errors/)
  t.equal(d?.headers['idempotency-key'], idempotencyKey({ service: 'checkout', version: '2.4.1', trigger: 'errors' }))

  const line = firedLines(s, 'errors')[0]
  t.match(line, { level: 'warn', metric: 'error_rate', threshold: 0.5, action: 'rollback' }, 'fired at warn with its reading')
  t.ok((line?.requests as number) >= 5 && line?.value === 1)

  const trig = await triggerOf(s, 'errors')
  t.match(trig, { state: 'fired', fired: 1, value: 1, metric: 'error_rate', threshold: 0.5, action: 'rollback', minRequests: 5 })
  t.ok(trig.requests >= 5 && trig.errors === trig.requests)
  t.type(trig.firedAt, 'string')
  t.match(trig.lastOutcome, /^rollback m-/)

  const entries = (await auditEntries(s)).filter((e) => e.action === 'mitigation.rollback')
  t.equal(entries.length, 1, 'one audited rollback')
  t.match(entries[0], { requester: 'trigger:errors', source: 'trigger:errors', result: 'running', targets: ['2.4.1'] })
  t.match(entries[0].reason, /trigger errors: error_rate/)
  t.ok(await eventually(async () => (await auditEntries(s)).some((e) => e.action === 'mitigation.rollback.result' && e.result === 'succeeded' && e.id === entries[0].id), 30_000), 'and then succeeded, in the background')
  const state = await admin(s.admin, 'GET', '/v1/state')
  t.match(state.body.mitigations, [{ action: 'rollback', source: 'trigger:errors' }])
})

t.test('below minRequests a trigger is inconclusive and never fires; GET /v1/state shows each trigger', async (t) => {
  const { s, l } = await oneRoute(t,
    errorTrigger({ minRequests: 10, window: '10s' }),
    // no name, no minRequests: both defaults
    { metric: 'error_rate', threshold: 0.5, window: '10s', action: 'notify' })
  const before = await triggerOf(s, 'errors')
  t.match(before, { name: 'errors', state: 'inconclusive', value: null, requests: 0, errors: 0, fired: 0, firedAt: null, window: '10s', scope: { route: null, upstream: null } })

  t.same(await l.burst('/fail', 6), [500, 500, 500, 500, 500, 500])
  evaluate(s)
  const trig = await triggerOf(s, 'errors')
  t.match(trig, { state: 'inconclusive', value: 1, requests: 6, errors: 6, fired: 0, threshold: 0.5, minRequests: 10 }, 'every request failed, but 6 < minRequests')
  const named = await triggerOf(s, 'error_rate_0_5_10s')
  t.ok(named !== undefined, 'a trigger without a name is named from metric, threshold and window')
  t.match(named, { minRequests: 20, state: 'inconclusive', requests: 6 })

  await sleep(1200) // the sidecar's own timer agrees
  t.equal(s.logs.filter((x) => x.event === 'trigger_fired').length, 0, 'no trigger fired')
  t.equal(await metricValue(s.ops, 'breakwater_trigger_fired_total'), 0)

  // 19 failures in the window: enough for minRequests 10, still under the default of 20.
  await l.burst('/fail', 13)
  evaluate(s)
  t.match(await triggerOf(s, 'errors'), { state: 'fired', fired: 1 })
  t.match(await triggerOf(s, 'error_rate_0_5_10s'), { state: 'inconclusive', requests: 19, errors: 19, fired: 0 })
  t.equal(await metricValue(s.ops, 'breakwater_trigger_fired_total', { trigger: 'errors' }), 1)
  t.equal(await metricValue(s.ops, 'breakwater_trigger_fired_total', { trigger: 'error_rate_0_5_10s' }), 0, 'the derived name is the metric label')
  t.equal(await metricValue(s.ops, 'breakwater_trigger_value', { trigger: 'error_rate_0_5_10s' }), 1, 'an inconclusive trigger still shows its value')
})

t.test('the verifier\'s own probes are not users\' traffic: no trigger window and no triage signal counts them, and they dilute nothing', async (t) => {
  const { s, l } = await oneRoute(t, errorTrigger(), { name: 'slow-p99', metric: 'p99_latency', threshold: 2000, window: '5s', minRequests: 5, action: 'notify' })
  const probe = async (path: string): Promise<number> =>
    (await send(s.proxy, path, { headers: { 'x-breakwater-synthetic': 'i-probe', 'x-breakwater-probe': s.sidecar.dataPlane.probeKey } })).status
  // A probe of a dead path, then of a stalled one, again and again: nothing users sent.
  t.same(await Promise.all(Array.from({ length: 8 }, async () => await probe('/fail'))), Array(8).fill(500))
  t.same(await Promise.all(Array.from({ length: 6 }, async () => await probe('/stall'))), Array(6).fill(200))
  evaluate(s)
  t.match(await triggerOf(s, 'errors'), { state: 'inconclusive', requests: 0, errors: 0, fired: 0 }, 'probes alone: no error rate to judge')
  t.match(await triggerOf(s, 'slow-p99'), { state: 'inconclusive', requests: 0, fired: 0 }, 'probes alone: no p99 to judge')
  let triage = (await admin(s.admin, 'GET', '/v1/triage')).body
  t.equal(triage.evidence.all.current.requests, 0, 'triage saw no users\' request')
  t.equal(triage.scenario, 'healthy', 'and calls nothing elevated')
  // Users failing while probes pass: the probes do not dilute the users' error rate.
  t.same(await l.burst('/fail', 6), Array(6).fill(500))
  t.same(await Promise.all(Array.from({ length: 10 }, async () => await probe('/ok'))), Array(10).fill(200))
  evaluate(s)
  t.match(await triggerOf(s, 'errors'), { state: 'fired', requests: 6, errors: 6, value: 1 }, 'the users\' error rate, whole')
  triage = (await admin(s.admin, 'GET', '/v1/triage')).body
  t.match(triage.evidence.all.current, { requests: 6, errorRate: 1 }, 'triage reads the users\' requests only')
  t.equal(firedLines(s, 'slow-p99').length, 0, 'the stalled probes never fired the p99 trigger')
})

t.test('what error_rate counts: upstream 5xx, 502, 504 and a circuit opened by failures; never kill switches, forced circuits or bulkheads', async (t) => {
  const up = await app(t)
  const dead = await refusedUrl()
  const routes = [
    { name: 'boom', match: { pathPrefix: '/boom' }, upstream: 'app' },
    { name: 'dead', match: { pathPrefix: '/dead' }, upstream: 'dead' },
    { name: 'timeout', match: { pathPrefix: '/timeout' }, upstream: 'app', timeoutMs: 100 },
    { name: 'fine', match: { pathPrefix: '/fine' }, upstream: 'app' },
    { name: 'missing', match: { pathPrefix: '/missing' }, upstream: 'app' },
    { name: 'killed', match: { pathPrefix: '/killed' }, upstream: 'app', killSwitch: 'killedFeature' },
    { name: 'forced', match: { pathPrefix: '/forced' }, upstream: 'forcedUp' },
    { name: 'bulk', match: { pathPrefix: '/bulk' }, upstream: 'bulkUp' },
    { name: 'tripped', match: { pathPrefix: '/tripped' }, upstream: 'tripUp' }
  ]
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url }, dead: { url: dead }, forcedUp: { url: up.url }, bulkUp: { url: up.url }, tripUp: { url: up.url } },
    routes,
    featureFlags: { killedFeature: false },
    circuitBreakers: {
      bulkUp: { maxConcurrentRequests: 1, volumeThreshold: 1000 },
      tripUp: { volumeThreshold: 2, failureThreshold: 0.5, recoveryTimeout: 60_000 }
    },
    // A long window and an unreachable minRequests: these triggers only count.
    rollbackTriggers: routes.map((r) => ({ name: r.name, metric: 'error_rate', threshold: 0.99, window: '1m', minRequests: 100_000, action: 'notify', route: r.name }))
  })
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/forcedUp', { state: 'open', reason: 'isolate it' })).status, 200)
  const l = load(t, s)
  t.same(await l.burst('/boom/fail', 4), [500, 500, 500, 500])
  t.same(await l.burst('/dead', 2), [502, 502])
  t.same(await l.burst('/timeout/stall', 2), [504, 504])
  t.same(await l.burst('/fine', 5), [200, 200, 200, 200, 200])
  t.same(await l.burst('/missing', 3), [404, 404, 404], 'a 4xx is the client\'s problem, not an error')
  t.same(await l.burst('/killed', 3), [503, 503, 503])
  t.same(await l.burst('/forced', 3), [503, 503, 503])
  t.same((await l.burst('/bulk/slow', 2)).sort(), [200, 503], 'one through, one refused by the bulkhead')
  const tripped: number[] = []
  for (let i = 0; i < 6; i++) tripped.push((await send(s.proxy, '/tripped/fail')).status)
  t.ok(tripped.filter((c) => c === 503).length >= 3, `the circuit opened on failures (${tripped.join(' ')})`)
  evaluate(s)

  const counts: Record<string, [number, number]> = {}
  for (const r of routes) {
    const trig = await triggerOf(s, r.name)
    counts[r.name] = [trig.requests, trig.errors]
  }
  t.same(counts, {
    boom: [4, 4],
    dead: [2, 2],
    timeout: [2, 2],
    fine: [5, 0],
    missing: [3, 0],
    killed: [0, 0],
    forced: [0, 0],
    bulk: [1, 0],
    tripped: [6, 6]
  }, '[requests, errors] per route')
  t.equal((await triggerOf(s, 'killed')).value, null, 'no data, no value')
  t.equal(s.logs.filter((x) => x.event === 'trigger_fired').length, 0)
})

t.test('p99_latency fires on a slow upstream and stays quiet on a fast one', async (t) => {
  const up = await app(t)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [
      { name: 'slow', match: { pathPrefix: '/slow' }, upstream: 'app' },
      { name: 'warm', match: { pathPrefix: '/warm' }, upstream: 'app' },
      { name: 'fast', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    rollbackTriggers: [
      { name: 'slow-p99', metric: 'p99_latency', threshold: 2000, window: '5s', minRequests: 5, action: 'notify', route: 'slow' },
      { name: 'fast-p99', metric: 'p99_latency', threshold: 2000, window: '5s', minRequests: 5, action: 'notify', route: 'fast' }
    ]
  })
  const l = load(t, s)
  await l.burst('/warm', 16) // connections open, so the fast route measures the upstream only
  const [slow, fast] = await Promise.all([l.burst('/slow/stall', 8), l.burst('/quick', 8)])
  t.ok([...slow, ...fast].every((c) => c === 200))
  evaluate(s)
  const slowTrig = await triggerOf(s, 'slow-p99')
  // Lower bounds only: a busy machine may add latency, never remove the upstream's 3 s.
  t.match(slowTrig, { state: 'fired', fired: 1, requests: 8, errors: 0, metric: 'p99_latency', threshold: 2000 })
  t.ok(slowTrig.value >= 2500, `p99 is about the upstream's 3000 ms (${String(slowTrig.value)})`)
  const fastTrig = await triggerOf(s, 'fast-p99')
  t.match(fastTrig, { state: 'ok', fired: 0, requests: 8 })
  t.equal(firedLines(s, 'slow-p99').length, 1)
  t.match(firedLines(s, 'slow-p99')[0], { metric: 'p99_latency', threshold: 2000 })
  t.equal(firedLines(s, 'fast-p99').length, 0)
  t.equal(await metricValue(s.ops, 'breakwater_trigger_fired_total', { trigger: 'slow-p99' }), 1)
  const gauge = await metricValue(s.ops, 'breakwater_trigger_value', { trigger: 'slow-p99' })
  t.ok(gauge >= 2500, `the gauge is in ms (${gauge})`)
})

t.test('p99_latency is the time to response headers: a slow body does not count', async (t) => {
  const up = await app(t)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'api', match: { pathPrefix: '/' }, upstream: 'app' }],
    rollbackTriggers: [{ name: 'p99', metric: 'p99_latency', threshold: 2000, window: '5s', minRequests: 5, action: 'notify' }]
  })
  const l = load(t, s)
  const started = Date.now()
  t.same(await l.burst('/drip', 6), Array(6).fill(200))
  t.ok(Date.now() - started >= 2750, 'the bodies took their 3 s')
  evaluate(s)
  const trig = await triggerOf(s, 'p99')
  t.match(trig, { state: 'ok', fired: 0, requests: 6 }, 'the 3 s bodies are not in the p99 to headers')
})

t.test('p99_latency needs minRequests answers with a latency: refusals by an open circuit have none', async (t) => {
  const up = await app(t)
  // 300 ms answers the breaker counts as failures: two open the circuit, then it refuses at once.
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'api', match: { pathPrefix: '/' }, upstream: 'app' }],
    circuitBreakers: { app: { volumeThreshold: 2, failureThreshold: 0.5, failureStatuses: [200], recoveryTimeout: 60_000 } },
    rollbackTriggers: [{ name: 'p99', metric: 'p99_latency', threshold: 100, window: '5s', minRequests: 5, action: 'notify' }]
  })
  const l = load(t, s)
  t.same(await l.burst('/slow', 2), [200, 200])
  t.equal(s.sidecar.dataPlane.circuit('app')?.state, 'open', 'the two slow answers opened the circuit')
  t.same(await l.burst('/slow', 8), Array(8).fill(503), 'then it refuses')
  evaluate(s)
  const trig = await triggerOf(s, 'p99')
  t.match(trig, { state: 'inconclusive', fired: 0 }, 'a p99 of two answers is not judged, though ten requests are in the window')
  t.equal(trig.requests, 2, 'its volume is the answers with a latency')
})

t.test('for: the breach must hold that long, checked by the sidecar\'s own 1 s evaluation', async (t) => {
  const up = await app(t)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'api', match: { pathPrefix: '/' }, upstream: 'app' }],
    rollbackTriggers: [errorTrigger({ minRequests: 3, for: '1s' })]
  })
  const l = load(t, s)
  const seen: Array<{ state: string, at: number }> = []
  const until = Date.now() + 60_000 // a ceiling only: the loop ends when the trigger fires
  while (Date.now() < until) {
    await l.burst('/fail', 3) // no direct evaluation here: only the sidecar's timer
    const trig = await triggerOf(s, 'errors')
    if (seen.at(-1)?.state !== trig.state) seen.push({ state: trig.state, at: Date.now() })
    if (trig.state === 'fired') break
    await sleep(100)
  }
  const states = seen.map((x) => x.state)
  t.same(states.slice(-2), ['pending', 'fired'], `pending, then fired (${states.join(' → ')})`)
  // The trigger's own clock, not when this loop happened to look (a busy machine sees
  // `pending` late): the breach began at pendingSince, and held for 1 s before it fired.
  const live = (s.sidecar.triggers as unknown as { live: Array<{ pendingSince: number | null, firedAt: number | null }> }).live[0]
  const held = live?.pendingSince != null && live.firedAt !== null ? live.firedAt - live.pendingSince : -1
  t.ok(held >= 1000, `held for 1 s first (${held} ms)`)
  t.equal(firedLines(s, 'errors').length, 1)
})

t.test('a fired trigger re-arms only after a full window below its threshold, then fires again on a new burst', async (t) => {
  const { s, l } = await oneRoute(t, errorTrigger())
  await l.burst('/fail', 8)
  evaluate(s)
  t.match(await triggerOf(s, 'errors'), { state: 'fired', fired: 1, lastOutcome: 'notified' })

  // Recovery: steady successes, watched every 100 ms.
  const seen: Array<{ state: string, at: number, fired: number }> = []
  const until = Date.now() + 60_000 // a ceiling only: the loop ends when the trigger re-arms
  while (Date.now() < until) {
    await l.burst('/ok', 4)
    evaluate(s)
    const trig = await triggerOf(s, 'errors')
    if (seen.at(-1)?.state !== trig.state) seen.push({ state: trig.state, at: Date.now(), fired: trig.fired })
    if (trig.state === 'ok') break
    await sleep(100)
  }
  t.same(seen.map((x) => x.state), ['fired', 'rearming', 'ok'], 'fired → rearming → ok')
  const rearming = seen.find((x) => x.state === 'rearming')
  const ok = seen.find((x) => x.state === 'ok')
  t.ok(rearming !== undefined && ok !== undefined && ok.at - rearming.at >= ERROR_WINDOW_MS - 500, `below the threshold for a full ${ERROR_WINDOW_MS / 1000} s window before re-arming (${ok !== undefined && rearming !== undefined ? ok.at - rearming.at : '?'} ms)`)
  t.ok(seen.every((x) => x.fired === 1), 'it did not fire again while recovering')
  t.equal(s.logs.filter((x) => x.event === 'trigger_rearmed' && x.trigger === 'errors').length, 1, 'a trigger_rearmed line')

  // A new incident: failures until they dominate the window again.
  t.ok(await eventually(async () => {
    await l.burst('/fail', 8)
    evaluate(s)
    return (await triggerOf(s, 'errors')).fired === 2
  }, 30_000, 100), 'a new incident fires it again')
  t.equal((await triggerOf(s, 'errors')).state, 'fired')
  t.equal(firedLines(s, 'errors').length, 2)
  t.equal(await metricValue(s.ops, 'breakwater_trigger_fired_total', { trigger: 'errors' }), 2)
})

function checkoutConfig (url: string, trigger: Record<string, unknown>): Record<string, unknown> {
  return {
    service: 'checkout',
    upstreams: { app: { url } },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'newCheckout' },
      { name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { newCheckout: true },
    rollbackTriggers: [trigger]
  }
}

t.test('killSwitch action kills the named flag; its refusals do not keep the trigger firing', async (t) => {
  const up = await app(t)
  // A 5 s window: a burst and its evaluation a stalled second or two apart still see each other.
  const s = await startTestSidecar(t, checkoutConfig(up.url, { name: 'checkout-errors', metric: 'error_rate', threshold: 0.3, window: '5s', minRequests: 5, action: 'killSwitch', flags: ['newCheckout'] }))
  const l = load(t, s)
  const mixed = async (): Promise<number[]> => [...await l.burst('/checkout/fail', 3), ...await l.burst('/home', 3)]
  t.same(await mixed(), [500, 500, 500, 200, 200, 200])
  evaluate(s)
  t.ok(await eventually(async () => /^killSwitch m-/.test((await triggerOf(s, 'checkout-errors')).lastOutcome ?? '')), 'the kill switch was applied')
  const state = await admin(s.admin, 'GET', '/v1/state')
  t.equal(state.body.flags.newCheckout.enabled, false)
  t.match(state.body.flags.newCheckout.override, { enabled: false, source: 'trigger:checkout-errors' })
  t.match(state.body.mitigations, [{ action: 'killSwitch', targets: ['newCheckout'], source: 'trigger:checkout-errors' }])
  const refused = await send(s.proxy, '/checkout/fail')
  t.equal(refused.status, 503)
  t.equal(refused.headers['x-breakwater-mitigation'], 'kill-switch')
  const audit = (await auditEntries(s)).filter((e) => e.action === 'mitigation.killSwitch')
  t.equal(audit.length, 1)
  t.match(audit[0], { requester: 'trigger:checkout-errors', targets: ['newCheckout'], result: 'applied' })
  t.match(audit[0].reason, /trigger checkout-errors/)

  // The same mix keeps coming: half of it is now refused with 503, which must not count.
  const hits = up.received.filter((r) => r.url.startsWith('/checkout')).length
  const seen = new Set<string>()
  const statuses: number[] = []
  // Until it re-arms (a whole window below the threshold), with a ceiling far past that.
  const until = Date.now() + 60_000
  while (Date.now() < until) {
    statuses.push(...await mixed())
    evaluate(s)
    const state = (await triggerOf(s, 'checkout-errors')).state as string
    seen.add(state)
    if (state === 'ok') break
    await sleep(100)
  }
  t.ok(statuses.filter((c) => c === 503).length >= 30 && statuses.every((c) => c !== 500), 'checkout stayed killed')
  t.equal(up.received.filter((r) => r.url.startsWith('/checkout')).length, hits, 'the upstream saw no checkout request')
  const trig = await triggerOf(s, 'checkout-errors')
  t.equal(trig.errors, 0, 'kill-switch refusals are not errors')
  t.equal(trig.state, 'ok', `the trigger re-armed (states seen: ${[...seen].join(', ')})`)
  t.equal(trig.fired, 1)
  t.equal(await metricValue(s.ops, 'breakwater_trigger_fired_total', { trigger: 'checkout-errors' }), 1)
  t.equal((await auditEntries(s)).filter((e) => e.action === 'mitigation.killSwitch').length, 1, 'one kill for one incident')
})

t.test('circuitBreak action forces the trigger\'s upstream open; forced refusals are not counted', async (t) => {
  const up = await app(t)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url }, pay: { url: up.url } },
    routes: [
      { name: 'pay', match: { pathPrefix: '/pay' }, upstream: 'pay' },
      { name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    // A 10 s window: the burst, its evaluation and the later count of the same requests all fall
    // in it, however slowly a busy machine runs them.
    rollbackTriggers: [{ name: 'pay-errors', metric: 'error_rate', threshold: 0.5, window: '10s', minRequests: 5, action: 'circuitBreak', upstream: 'pay' }]
  })
  const l = load(t, s)
  t.same(await l.burst('/pay/fail', 6), [500, 500, 500, 500, 500, 500])
  t.same(await l.burst('/home/fail', 6), [500, 500, 500, 500, 500, 500], 'failures elsewhere are out of the trigger\'s scope')
  evaluate(s)
  t.ok(await eventually(async () => /^circuitBreak m-/.test((await triggerOf(s, 'pay-errors')).lastOutcome ?? '')), 'the circuit was broken')
  const state = await admin(s.admin, 'GET', '/v1/state')
  t.match(state.body.circuits.pay, { state: 'open', forced: 'open', forcedBy: { state: 'open', source: 'trigger:pay-errors' } })
  t.equal(state.body.circuits.app, undefined, 'only the trigger\'s upstream')
  t.match(state.body.mitigations, [{ action: 'circuitBreak', targets: ['pay'], source: 'trigger:pay-errors' }])
  const before = (await triggerOf(s, 'pay-errors')).requests
  const hits = up.received.length
  const refused = await l.burst('/pay/fail', 10)
  t.same(refused, Array(10).fill(503))
  t.equal((await send(s.proxy, '/pay')).headers['x-breakwater-mitigation'], 'circuit-open')
  t.equal(up.received.length, hits, 'the upstream saw none of them')
  t.equal((await send(s.proxy, '/home')).status, 200, 'other upstreams are untouched')
  evaluate(s)
  t.match(await triggerOf(s, 'pay-errors'), { requests: before, fired: 1 }, 'refusals by a forced circuit are not recorded')
  const audit = (await auditEntries(s)).filter((e) => e.action === 'mitigation.circuitBreak')
  t.equal(audit.length, 1)
  t.match(audit[0], { requester: 'trigger:pay-errors', targets: ['pay'], result: 'applied' })
})

t.test('operator wins: a flag an operator forced on is left alone by a killSwitch trigger', async (t) => {
  const up = await app(t)
  const s = await startTestSidecar(t, checkoutConfig(up.url, { name: 'checkout-errors', metric: 'error_rate', threshold: 0.3, window: '10s', minRequests: 5, action: 'killSwitch', flags: ['newCheckout'] }))
  t.equal((await admin(s.admin, 'PUT', '/v1/flags/newCheckout', { enabled: true, reason: 'keep checkout on during the sale' })).status, 200)
  const l = load(t, s)
  await l.burst('/checkout/fail', 8)
  evaluate(s)
  t.ok(await eventually(async () => /^skipped/.test((await triggerOf(s, 'checkout-errors')).lastOutcome ?? '')), 'the trigger stood down')
  const trig = await triggerOf(s, 'checkout-errors')
  t.match(trig, { state: 'fired', fired: 1, lastOutcome: /operator_override/ })
  const state = await admin(s.admin, 'GET', '/v1/state')
  t.match(state.body.flags.newCheckout, { enabled: true, override: { enabled: true, source: 'operator', reason: 'keep checkout on during the sale' } })
  t.same(state.body.mitigations, [])
  t.equal((await send(s.proxy, '/checkout/fail')).status, 500, 'checkout still reaches the app')
  const actions = (await auditEntries(s)).map((e) => e.action)
  t.notOk(actions.includes('mitigation.killSwitch'), `no trigger mitigation in the audit (${actions.join(', ')})`)
  // The audit tells the refusal as it tells an operator's: who tried what, on what, and why not.
  const refused = (await auditEntries(s)).filter((e) => e.action === 'refused')
  t.match(refused, [{ wanted: 'mitigation.killSwitch', targets: ['newCheckout'], result: 'operator_override', status: 409, requester: 'trigger:checkout-errors', trigger: 'checkout-errors', reason: /^trigger checkout-errors: / }], 'the refused mitigation is audited')
  t.equal(refused.length, 1)
  t.equal(firedLines(s, 'checkout-errors').length, 1)
})

t.test('operator wins: a circuit an operator forced closed is left alone by a circuitBreak trigger', async (t) => {
  const up = await app(t)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url }, pay: { url: up.url } },
    routes: [
      { name: 'pay', match: { pathPrefix: '/pay' }, upstream: 'pay' },
      { name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    circuitBreakers: { pay: { volumeThreshold: 1000 } },
    rollbackTriggers: [{ name: 'pay-errors', metric: 'error_rate', threshold: 0.5, window: '10s', minRequests: 5, action: 'circuitBreak', upstreams: ['pay'] }]
  })
  t.equal((await admin(s.admin, 'PUT', '/v1/circuits/pay', { state: 'closed', reason: 'pay must stay reachable' })).status, 200)
  const l = load(t, s)
  await l.burst('/pay/fail', 8)
  evaluate(s)
  t.ok(await eventually(async () => /^skipped/.test((await triggerOf(s, 'pay-errors')).lastOutcome ?? '')), 'the trigger stood down')
  const state = await admin(s.admin, 'GET', '/v1/state')
  t.match(state.body.circuits.pay, { state: 'closed', forced: 'closed', forcedBy: { source: 'operator' } })
  t.same(state.body.mitigations, [])
  t.equal((await send(s.proxy, '/pay/fail')).status, 500, 'pay still reaches its upstream')
})

t.test('rollback trigger: one rollback per incident, and a second incident inside the cooldown does not roll back again', async (t) => {
  const up = await app(t)
  const cd = await startReceiver([200])
  t.teardown(cd.close)
  const input = (version: string): Record<string, unknown> => ({
    service: 'checkout',
    version,
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'api', match: { pathPrefix: '/' }, upstream: 'app' }],
    rollbackTriggers: [errorTrigger({ action: 'rollback' })],
    rollback: { type: 'webhook', url: cd.url, cooldown: '10m' }
  })
  const s = await startTestSidecar(t, input('2.4.1'))
  const l = load(t, s)
  await l.burst('/fail', 8)
  evaluate(s)
  t.ok(await eventually(() => cd.deliveries.length === 1), 'first incident: rolled back')
  t.match(cd.deliveries[0]?.body, { version: '2.4.1', trigger: 'errors' })

  // The CD system deploys another version; the same trigger recovers, then a second incident.
  const { config: next } = resolveConfig(testSidecarInput(input('2.4.2'), s.stateDir))
  await s.sidecar.apply(next)
  t.ok(await eventually(async () => {
    await l.burst('/ok', 4)
    evaluate(s)
    return (await triggerOf(s, 'errors')).state === 'ok'
  }, 60_000, 100), 'the trigger re-armed on healthy traffic')
  t.ok(await eventually(async () => {
    await l.burst('/fail', 8)
    evaluate(s)
    return (await triggerOf(s, 'errors')).fired === 2
  }, 30_000, 100), 'a second incident fires the trigger again')
  t.ok(await eventually(async () => /^skipped/.test((await triggerOf(s, 'errors')).lastOutcome ?? '')), 'the second firing stood down')
  const trig = await triggerOf(s, 'errors')
  t.match(trig, { fired: 2, lastOutcome: /rollback_cooldown/ })
  await sleep(300)
  t.equal(cd.deliveries.length, 1, 'no second rollback inside the cooldown')
  t.equal((await auditEntries(s)).filter((e) => e.action === 'mitigation.rollback').length, 1)
  t.match((await auditEntries(s)).filter((e) => e.action === 'refused'), [{ wanted: 'mitigation.rollback', targets: ['2.4.2'], result: 'rollback_cooldown', requester: 'trigger:errors', trigger: 'errors' }], 'the refused second rollback is audited, naming the version it would have rolled back')
  t.equal(firedLines(s, 'errors').length, 2, 'both incidents were logged')
})

t.test('requireRecentChange: a version that has run fine for days is not rolled back; the trigger notifies with the triage', async (t) => {
  const up = await app(t)
  const cd = await startReceiver([200])
  t.teardown(cd.close)
  const hook = await startReceiver([200])
  t.teardown(hook.close)
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-trigger-'))
  t.teardown(() => rmSync(stateDir, { recursive: true, force: true }))
  const input = {
    service: 'checkout',
    version: '2.4.1',
    stateDir,
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'api', match: { pathPrefix: '/' }, upstream: 'app' }],
    rollbackTriggers: [errorTrigger({ action: 'rollback' })],
    rollback: { type: 'webhook', url: cd.url },
    notifications: { webhooks: [`${hook.url}/events`] }
  }
  // This version and this config were first seen two days ago.
  const twoDaysAgo = new Date(Date.now() - 2 * 86_400_000).toISOString()
  const hash = configHash(resolveConfig(testSidecarInput(input, stateDir)).config)
  writeFileSync(join(stateDir, 'state.json'), JSON.stringify({ version: 1, overrides: {}, circuits: {}, mitigations: [], versions: { '2.4.1': twoDaysAgo }, configs: { [hash]: twoDaysAgo }, rolledBack: {} }))
  const s = await startTestSidecar(t, input)
  const state = await admin(s.admin, 'GET', '/v1/state')
  t.equal(state.body.versionSince, twoDaysAgo)
  t.equal(state.body.configSince, twoDaysAgo)

  const l = load(t, s)
  await l.burst('/fail', 8)
  evaluate(s)
  t.ok(await eventually(() => hook.deliveries.some((d) => d.body.event === 'trigger_fired')), 'the trigger notified')
  const fired = hook.deliveries.find((d) => d.body.event === 'trigger_fired')
  t.match(fired?.body, { service: 'checkout', version: '2.4.1', trigger: 'errors', details: { action: 'rollback', rollback: /not run/ } })
  t.type(fired?.body.details.triage, 'object', 'the triage is attached')
  t.notOk(fired?.body.details.triage === null)
  t.match((await triggerOf(s, 'errors')).lastOutcome, /no recent change/)
  await sleep(500)
  t.equal(cd.deliveries.length, 0, 'the rollback action was not called')
  t.equal((await auditEntries(s)).filter((e) => e.action === 'mitigation.rollback').length, 0)
  t.equal(firedLines(s, 'errors').length, 1)
})

t.test('requireRecentChange: once the change is older than the limit, the trigger notifies instead of rolling back', async (t) => {
  const up = await app(t)
  const cd = await startReceiver([200])
  t.teardown(cd.close)
  const hook = await startReceiver([200])
  t.teardown(hook.close)
  const s = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ name: 'api', match: { pathPrefix: '/' }, upstream: 'app' }],
    rollbackTriggers: [errorTrigger({ action: 'rollback' })],
    rollback: { type: 'webhook', url: cd.url, requireRecentChange: '1s' },
    notifications: { webhooks: [hook.url] }
  })
  await sleep(1300) // version and config first seen at start: now older than 1 s
  const l = load(t, s)
  await l.burst('/fail', 8)
  evaluate(s)
  t.ok(await eventually(() => hook.deliveries.some((d) => d.body.event === 'trigger_fired')))
  t.type(hook.deliveries.find((d) => d.body.event === 'trigger_fired')?.body.details.triage, 'object')
  await sleep(300)
  t.equal(cd.deliveries.length, 0, 'no rollback')
})

/**
 * The wall clock seen by the sidecar (it runs in this process), stepped by `stepMs` from the
 * real one: held still at that point when `held` (a clock stepped back onto the seconds the
 * windows just filled), else running on from it. Put back in the test's teardown.
 */
function stepWallClock (t: Test, stepMs: number, held: boolean): void {
  const real = Date.now.bind(Date)
  const at = real() + stepMs
  Date.now = held ? () => at : () => real() + stepMs
  t.teardown(() => { Date.now = real })
}

/** Two evaluations of the sidecar's own 1 s timer (timers fire in the order they are due). */
async function twoTicks (): Promise<void> {
  await sleep(2500)
}

t.test('a wall clock stepped back (NTP, a VM restore) does not blind the triggers: failures after the step fire them', async (t) => {
  const { s, l } = await oneRoute(t, errorTrigger())
  t.same(await l.burst('/ok', 10), Array(10).fill(200))
  // Back 28 × 128 s: onto the very second the windows just filled, had they been keyed on it.
  stepWallClock(t, -3_584_000, true)
  const burstFrom = performance.now()
  t.same(await l.burst('/fail', 20), Array(20).fill(500))
  await twoTicks()
  const trig = await triggerOf(s, 'errors')
  t.match(trig, { state: 'fired', fired: 1 }, 'the failures after the step fired the trigger')
  t.ok(trig.requests >= 20 && trig.errors >= 20, `the window holds them (${String(trig.requests)} requests, ${String(trig.errors)} errors)`)
  t.equal(trig.firedAt, new Date(Date.now()).toISOString(), 'firedAt is what the wall clock read')
  const incident = ((await admin(s.admin, 'GET', '/v1/incidents')).body.incidents as any[])[0]
  t.equal(incident?.detectedAt, new Date(Date.now()).toISOString(), 'detected at the wall clock\'s time')
  t.type(incident?.detection?.firstFailureAt, 'string', 'the first failure is found in the window')
  // The wall clock is held still: the first failure is dated at most the time this test has
  // taken since the burst began (its second truncated) before it, never an hour away.
  const dated = Date.parse(incident.detection.firstFailureAt)
  const since = performance.now() - burstFrom + 1000
  t.ok(dated <= Date.now() && dated >= Date.now() - since, `and dated on the wall clock's scale (${String(incident.detection.firstFailureAt)}, within ${Math.round(since)} ms before it)`)
})

t.test('a wall clock stepped forward neither empties a trigger\'s window nor cuts its `for` short', async (t) => {
  const { s, l } = await oneRoute(t, errorTrigger({ window: '30s', for: '1h' }))
  t.same(await l.burst('/fail', 10), Array(10).fill(500))
  await twoTicks()
  t.match(await triggerOf(s, 'errors'), { state: 'pending', requests: 10, errors: 10 }, 'the breach began')
  stepWallClock(t, 2 * 3_600_000, false)
  await twoTicks()
  t.match(await triggerOf(s, 'errors'), { state: 'pending', requests: 10, errors: 10, fired: 0 }, 'two hours later by the wall clock, seconds later in fact: still pending on the same failures')
  t.same(await l.burst('/fail', 10), Array(10).fill(500))
  await twoTicks()
  t.match(await triggerOf(s, 'errors'), { state: 'pending', requests: 20, fired: 0 }, 'more failures: still pending, the hour of `for` not over')
  t.equal(firedLines(s, 'errors').length, 0)
})
