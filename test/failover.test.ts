import t, { type Test } from 'tap'
import { startUpstream, type Handler, type TestUpstream } from './helpers/upstream.js'
import { startTestSidecar, testSidecarInput } from './helpers/sidecar.js'
import { send, eventually, type Reply } from './helpers/http.js'
import { scrape, sumOf } from './helpers/metrics.js'
import { admin } from './helpers/admin.js'
import { resolveConfig, ConfigError } from '../src/config/load.js'

/** An upstream that answers `name` with 200, or 503 while `state.failing`. */
function switchable (name: string, state: { failing: boolean }): Handler {
  return (req, res) => {
    const status = state.failing ? 503 : 200
    res.writeHead(status, { 'content-type': 'text/plain' })
    res.end(req.url === '/healthz' ? 'health' : `${name} ${status}`)
  }
}

/** A switchable primary (failing or not) and a healthy `dr`, closed in teardown. */
async function pair (t: Test, failing: boolean): Promise<{ primary: TestUpstream, dr: TestUpstream, primaryState: { failing: boolean } }> {
  const primaryState = { failing }
  const primary = await startUpstream(switchable('primary', primaryState))
  const dr = await startUpstream(switchable('dr', { failing: false }))
  t.teardown(primary.close)
  t.teardown(dr.close)
  return { primary, dr, primaryState }
}

function config (primary: string, dr: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    upstreams: { primary: { url: primary, failover: 'dr', failbackAfter: '300ms' }, dr: { url: dr } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'primary' }],
    circuitBreakers: { primary: { volumeThreshold: 4, failureThreshold: 0.5, recoveryTimeout: '1s' } },
    ...extra
  }
}

/**
 * The primary has recovered while its failover is down: once real traffic's half-open probe
 * closes its circuit, the next request is the primary's, without waiting for `failbackAfter`.
 */
async function backAtOnce (t: Test, sc: Awaited<ReturnType<typeof startTestSidecar>>, served: string): Promise<void> {
  const circuit = sc.sidecar.dataPlane.circuit('primary')
  t.ok(await eventually(async () => {
    await send(sc.proxy, '/probe')
    return circuit?.state === 'closed'
  }, 20_000, 50), 'the half-open probe closed the primary\'s circuit')
  const r = await send(sc.proxy, '/after')
  t.equal(r.status, 200, served)
  t.equal(r.body, 'primary 200', 'by the primary, available again')
  t.equal(r.headers['x-breakwater-failover'], undefined)
  t.equal(sumOf(await scrape(sc.ops), 'breakwater_failover_active', { upstream: 'primary' }), 0, 'failed back')
  t.ok(sc.logs.some((l) => l.event === 'failover_lifted' && l.upstream === 'primary' && l.why === 'failover unavailable'), 'failback logged, saying why it did not wait')
}

t.test('failover: engaged by the first request after the circuit opens, failback after failbackAfter, no failed request in between', async (t) => {
  const { primary, dr, primaryState } = await pair(t, true)
  const sc = await startTestSidecar(t, config(primary.url, dr.url))
  const circuit = sc.sidecar.dataPlane.circuit('primary')
  t.ok(circuit !== undefined)

  // The failures that open the circuit: the upstream's own 503s, relayed.
  let opening = 0
  while (circuit?.state !== 'open') {
    const r = await send(sc.proxy, `/open/${opening++}`)
    t.equal(r.status, 503, 'the failing upstream\'s answer')
    if (opening > 20) break
  }
  t.equal(circuit?.state, 'open', `the circuit opened after ${opening} failures`)

  const first = await send(sc.proxy, '/first-after-open')
  t.equal(first.status, 200, 'the request that finds the circuit open is served')
  t.equal(first.body, 'dr 200', 'by the failover upstream')
  t.equal(first.headers['x-breakwater-failover'], 'dr', 'marked')
  let samples = await scrape(sc.ops)
  t.equal(sumOf(samples, 'breakwater_failover_active', { upstream: 'primary' }), 1, 'breakwater_failover_active is 1')

  primaryState.failing = false // the primary recovers
  const replies: Reply[] = []
  let closedAt = -1
  // Until the traffic is back on the primary for good: every request answered 200.
  const back = await eventually(async () => {
    const r = await send(sc.proxy, `/during/${replies.length}`)
    replies.push(r)
    if (closedAt === -1 && circuit?.state === 'closed') closedAt = replies.length
    return r.headers['x-breakwater-failover'] === undefined && replies.length > 1 && replies[replies.length - 2]?.headers['x-breakwater-failover'] === undefined && closedAt !== -1 && closedAt < replies.length - 1
  }, 20_000, 10)
  t.ok(back, 'traffic returned to the primary')
  t.same(replies.filter((r) => r.status !== 200).map((r) => `${r.status} ${r.body}`), [], 'zero failed requests from open to failback')
  t.ok(replies.some((r) => r.body === 'primary 200' && r.headers['x-breakwater-failover'] === undefined), 'the primary served again')
  t.ok(closedAt !== -1, 'the half-open probe (real traffic) closed the circuit')
  t.ok(replies.slice(closedAt).some((r) => r.headers['x-breakwater-failover'] === 'dr'), 'hysteresis: after the circuit closed, traffic stayed on the failover for a while')
  const after = await send(sc.proxy, '/after')
  t.equal(after.body, 'primary 200', 'and stays on the primary')
  samples = await scrape(sc.ops)
  t.equal(sumOf(samples, 'breakwater_failover_active', { upstream: 'primary' }), 0, 'breakwater_failover_active back to 0')
  t.ok(sc.logs.some((l) => l.event === 'failover_engaged' && l.upstream === 'primary' && l.to === 'dr'), 'engagement logged')
  t.ok(sc.logs.some((l) => l.event === 'failover_lifted' && l.upstream === 'primary'), 'failback logged')
})

t.test('failover: an upstream with no usable endpoint (health checks failing) fails over', async (t) => {
  const { primary, dr, primaryState } = await pair(t, true)
  const sc = await startTestSidecar(t, {
    upstreams: {
      primary: { url: primary.url, failover: 'dr', failbackAfter: '200ms', healthCheck: { path: '/healthz', intervalMs: 100, timeoutMs: 100, unhealthyThreshold: 1, healthyThreshold: 1 } },
      dr: { url: dr.url }
    },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'primary' }]
  })
  const upstream = (): { healthy: boolean } => sc.sidecar.dataPlane.runtime.upstreams.get('primary') as { healthy: boolean }
  t.ok(await eventually(() => !upstream().healthy, 10_000), 'the health check marks the only endpoint unhealthy')
  const r = await send(sc.proxy, '/x')
  t.equal(r.body, 'dr 200', 'served by the failover')
  t.equal(r.headers['x-breakwater-failover'], 'dr')
  primaryState.failing = false
  t.ok(await eventually(async () => (await send(sc.proxy, '/y')).body === 'primary 200', 10_000), 'back on the primary once healthy for failbackAfter')
})

t.test('failover: once the upstream is available again, a failover that is down itself does not hold its traffic for failbackAfter', async (t) => {
  const { primary, dr, primaryState } = await pair(t, true)
  // An hour of hysteresis: only the failover being down can bring the traffic back early.
  const sc = await startTestSidecar(t, config(primary.url, dr.url, {
    upstreams: { primary: { url: primary.url, failover: 'dr', failbackAfter: '1h' }, dr: { url: dr.url } }
  }))
  const dp = sc.sidecar.dataPlane
  const circuit = dp.circuit('primary')
  for (let i = 0; i < 20 && circuit?.state !== 'open'; i++) await send(sc.proxy, `/open/${i}`)
  t.equal(circuit?.state, 'open', 'the primary\'s circuit opened')
  t.equal((await send(sc.proxy, '/engaged')).body, 'dr 200', 'failed over')

  dp.force('dr', 'open') // the failover goes down too
  primaryState.failing = false // and the primary recovers
  await backAtOnce(t, sc, 'served, not refused by the failover\'s open circuit')
})

t.test('failover: a failover without a breaker that fails every answer does not hold the traffic for failbackAfter once the upstream is back', async (t) => {
  const { primary, primaryState } = await pair(t, true)
  const drState = { failing: false }
  const dr = await startUpstream(switchable('dr', drState))
  t.teardown(dr.close)
  // An hour of hysteresis, and the failover with one endpoint and no breaker: nothing marks it unavailable.
  const sc = await startTestSidecar(t, config(primary.url, dr.url, {
    upstreams: { primary: { url: primary.url, failover: 'dr', failbackAfter: '1h' }, dr: { url: dr.url } }
  }))
  const circuit = sc.sidecar.dataPlane.circuit('primary')
  for (let i = 0; i < 20 && circuit?.state !== 'open'; i++) await send(sc.proxy, `/open/${i}`)
  t.equal(circuit?.state, 'open', 'the primary\'s circuit opened')
  t.equal((await send(sc.proxy, '/engaged')).body, 'dr 200', 'failed over')

  drState.failing = true // the failover goes down too (it has no breaker to say so)
  for (let i = 0; i < 8; i++) {
    const r = await send(sc.proxy, `/both-down/${i}`)
    if (r.headers['x-breakwater-failover'] === 'dr') t.equal(r.body, 'dr 503', 'the failover fails')
  }
  primaryState.failing = false // the primary recovers
  await backAtOnce(t, sc, 'served, not the failing failover\'s 503')
})

t.test('forceFailover: by hand, to any upstream; the target\'s own breaker applies; survives a reload; lifted', async (t) => {
  const { primary, dr } = await pair(t, false)
  const input = {
    upstreams: { primary: { url: primary.url }, dr: { url: dr.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'primary' }],
    circuitBreakers: { dr: {} }
  }
  const sc = await startTestSidecar(t, input)
  const dp = sc.sidecar.dataPlane
  t.equal(dp.forceFailover('primary', undefined), false, 'no configured failover to default to')
  t.equal(dp.forceFailover('primary', 'primary'), false, 'not to itself')
  t.equal(dp.forceFailover('nope', 'dr'), false, 'unknown upstream')
  t.equal(dp.forceFailover('primary', 'nope'), false, 'unknown target')
  t.ok(dp.forceFailover('primary', 'dr'))
  let r = await send(sc.proxy, '/a')
  t.equal(r.body, 'dr 200')
  t.equal(r.headers['x-breakwater-failover'], 'dr')
  dp.force('dr', 'open')
  r = await send(sc.proxy, '/b')
  t.equal(r.status, 503, 'the failover upstream\'s circuit still refuses')
  t.equal(r.headers['x-breakwater-error'], 'circuit_open')
  t.equal(r.headers['x-breakwater-failover'], 'dr', 'and says where the request went')
  dp.force('dr', null)
  dp.apply(resolveConfig(testSidecarInput(input, sc.stateDir)).config)
  t.equal((await send(sc.proxy, '/c')).body, 'dr 200', 'kept across a reload')
  t.equal(sumOf(await scrape(sc.ops), 'breakwater_failover_active', { upstream: 'primary' }), 1)
  t.ok(dp.forceFailover('primary', null))
  r = await send(sc.proxy, '/d')
  t.equal(r.body, 'primary 200', 'lifted')
  t.equal(r.headers['x-breakwater-failover'], undefined)
})

t.test('a reload that removes a forced failover\'s target: logged, GET /v1/state says it is not in force, and it is again when the target comes back', async (t) => {
  const { primary, dr } = await pair(t, false)
  const other = await startUpstream(switchable('other', { failing: false }))
  t.teardown(other.close)
  const withOther = {
    upstreams: { primary: { url: primary.url, failover: 'dr' }, dr: { url: dr.url }, other: { url: other.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'primary' }],
    circuitBreakers: { primary: {} }
  }
  const sc = await startTestSidecar(t, withOther)
  const made = await admin(sc.admin, 'POST', '/v1/mitigations', { action: 'failover', upstreams: ['primary'], to: 'other', reason: 'region down' })
  t.equal(made.status, 201)
  t.equal((await send(sc.proxy, '/a')).body, 'other 200', 'forced')
  const inForce = async (): Promise<unknown> => ((await admin(sc.admin, 'GET', '/v1/state')).body.mitigations as Array<Record<string, unknown>>).find((m) => m.id === made.body.id)?.inForce
  t.equal(await inForce(), true)

  const { other: _gone, ...without } = withOther.upstreams
  await sc.sidecar.apply(resolveConfig(testSidecarInput({ ...withOther, upstreams: without }, sc.stateDir)).config)
  const r = await send(sc.proxy, '/b')
  t.equal(r.body, 'primary 200', 'the primary serves: the target is gone')
  t.ok(sc.logs.some((l) => l.event === 'override_kept' && l.upstream === 'primary' && l.failover === 'other'), 'the reload says the forced failover is kept but not in force')
  t.ok(sc.logs.some((l) => l.event === 'failover_lifted' && l.upstream === 'primary' && l.from === 'other' && l.why === 'reload'), 'and that traffic left the failover')
  t.equal(await inForce(), false, 'GET /v1/state does not claim it is in force')
  t.equal(sumOf(await scrape(sc.ops), 'breakwater_failover_active', { upstream: 'primary' }), 0)

  await sc.sidecar.apply(resolveConfig(testSidecarInput(withOther, sc.stateDir)).config)
  t.equal((await send(sc.proxy, '/c')).body, 'other 200', 'in force again when the target comes back')
  t.ok(sc.logs.some((l) => l.event === 'failover_engaged' && l.upstream === 'primary' && l.to === 'other' && l.why === 'reload'), 'and logged')
  t.equal(await inForce(), true)
})

t.test('a reload that removes or changes an engaged failover logs the move, and breakwater_failover_active goes to 0 instead of vanishing', async (t) => {
  const { primary, dr } = await pair(t, false)
  const other = await startUpstream(switchable('other', { failing: false }))
  t.teardown(other.close)
  const input = (failover: string | undefined): Record<string, unknown> => ({
    upstreams: { primary: { url: primary.url, ...(failover !== undefined ? { failover } : {}) }, dr: { url: dr.url }, other: { url: other.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'primary' }],
    circuitBreakers: { primary: {} }
  })
  const sc = await startTestSidecar(t, input('dr'))
  sc.sidecar.dataPlane.force('primary', 'open')
  t.equal((await send(sc.proxy, '/a')).body, 'dr 200', 'failed over')

  await sc.sidecar.apply(resolveConfig(testSidecarInput(input('other'), sc.stateDir)).config)
  t.equal((await send(sc.proxy, '/b')).body, 'other 200', 'the reload moved the traffic')
  t.ok(sc.logs.some((l) => l.event === 'failover_engaged' && l.upstream === 'primary' && l.to === 'other' && l.from === 'dr'), 'and said so')

  await sc.sidecar.apply(resolveConfig(testSidecarInput(input(undefined), sc.stateDir)).config)
  const r = await send(sc.proxy, '/c')
  t.equal(r.headers['x-breakwater-error'], 'circuit_open', 'no failover any more: the open circuit refuses')
  t.ok(sc.logs.some((l) => l.event === 'failover_lifted' && l.upstream === 'primary' && l.from === 'other' && l.why === 'reload'), 'the reload that took the failover away said so')
  const active = (await scrape(sc.ops)).filter((m) => m.name === 'breakwater_failover_active' && m.labels.upstream === 'primary')
  t.same(active.map((m) => m.value), [0], 'the series is 0, not gone')
})

t.test('validate: failover to an unknown upstream, to itself, chains and loops', async (t) => {
  const problems = (upstreams: Record<string, unknown>): string[] => {
    try {
      resolveConfig({ service: 's', upstreams, routes: [{ match: { pathPrefix: '/' }, upstream: 'a' }] })
    } catch (err) {
      t.type(err, ConfigError)
      return [...(err as ConfigError).problems]
    }
    t.fail('accepted')
    return []
  }
  const url = 'http://127.0.0.1:1'
  t.match(problems({ a: { url, failover: 'ghost' } }), [/^upstreams\.a\.failover: unknown upstream "ghost"/])
  t.match(problems({ a: { url, failover: 'a' } }), [/^upstreams\.a\.failover: an upstream cannot fail over to itself/])
  t.match(problems({ a: { url, failover: 'b' }, b: { url, failover: 'c' }, c: { url } }), [/^upstreams\.a\.failover: .*no failover chains/])
  const loop = problems({ a: { url, failover: 'b' }, b: { url, failover: 'a' } })
  t.ok(loop.some((p) => p.startsWith('upstreams.a.failover') && p.includes('no failover chains')), loop.join('; '))
  t.ok(loop.some((p) => p.startsWith('upstreams.b.failover') && p.includes('no failover chains')), loop.join('; '))
  t.match(problems({ a: { url, failbackAfter: '10s' } }), [/^upstreams\.a\.failbackAfter: needs failover/])
})

t.test('validate: a failover nothing can engage (no breaker, no health check, one endpoint) is warned about', async (t) => {
  const url = 'http://127.0.0.1:1'
  const warned = (upstreams: Record<string, unknown>, extra: Record<string, unknown> = {}): string[] =>
    resolveConfig({ service: 's', upstreams, routes: [{ match: { pathPrefix: '/' }, upstream: 'a' }], ...extra }).warnings.filter((w) => w.includes('.failover:'))
  t.match(warned({ a: { url, failover: 'b' }, b: { url } }), [/^upstreams\.a\.failover: a has no circuit breaker \(circuitBreakers\.a\), no healthCheck and one endpoint.*never fails over to b on its own/])
  t.same(warned({ a: { url, failover: 'b' }, b: { url } }, { circuitBreakers: { a: {} } }), [], 'a breaker can open')
  t.same(warned({ a: { url, failover: 'b', healthCheck: { path: '/healthz' } }, b: { url } }), [], 'a health check can fail')
  t.same(warned({ a: { endpoints: [url, 'http://127.0.0.1:2'], failover: 'b' }, b: { url } }), [], 'endpoints can be ejected')
  t.same(warned({ a: { url }, b: { url } }), [], 'no failover, nothing to say')
})
