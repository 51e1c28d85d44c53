import t from 'tap'
import { startUpstream, status, echo, type TestUpstream, type Handler } from './helpers/upstream.js'
import { startTestSidecar } from './helpers/sidecar.js'
import { send, eventually, sleep, type Reply } from './helpers/http.js'
import { scrape, sumOf } from './helpers/metrics.js'
import type { Test } from 'tap'
import { Pool } from 'undici'
import { Balancer, Endpoint } from '../src/proxy/balancer.js'
import type { UpstreamConfig } from '../src/config/types.js'

async function upstreams (t: Test, handlers: Handler[]): Promise<TestUpstream[]> {
  const out: TestUpstream[] = []
  for (const h of handlers) {
    const up = await startUpstream(h)
    t.teardown(up.close)
    out.push(up)
  }
  return out
}

function balanced (endpoints: TestUpstream[], extra: Record<string, unknown> = {}, route: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    upstreams: { app: { endpoints: endpoints.map((e) => e.url), ...extra } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', ...route }]
  }
}

t.test('round robin spreads requests evenly over three endpoints', async (t) => {
  const eps = await upstreams(t, [echo, echo, echo])
  const { proxy } = await startTestSidecar(t, balanced(eps))
  for (let i = 0; i < 30; i++) t.equal((await send(proxy, `/rr/${i}`)).status, 200)
  t.same(eps.map((e) => e.received.length), [10, 10, 10], 'ten each')
  // Strict rotation: consecutive requests never land on the same endpoint.
  const order = eps.flatMap((e, i) => e.received.map((r) => ({ i, n: Number(r.url.split('/')[2]) }))).sort((x, y) => x.n - y.n).map((x) => x.i)
  for (let k = 1; k < order.length; k++) if (order[k] === order[k - 1]) t.fail(`requests ${k - 1} and ${k} went to the same endpoint`)
})

t.test('least_request sends new requests away from an endpoint holding slow requests', async (t) => {
  // Endpoint 0 holds `/hold/*` requests until the end of the test and answers anything else at
  // once; endpoint 1 answers everything at once. While requests are held on 0, the power of two
  // choices (with two endpoints: always both compared) must pick 1 for every new request.
  const waiting: Array<() => void> = []
  const holding: Handler = (req, res, body) => {
    if (req.url?.startsWith('/hold/') === true) waiting.push(() => echo(req, res, body))
    else echo(req, res, body)
  }
  const eps = await upstreams(t, [holding, echo])
  const [busy, idle] = eps as [TestUpstream, TestUpstream]
  const { proxy } = await startTestSidecar(t, balanced(eps, { balance: 'least_request' }))
  const held: Array<Promise<Reply>> = []
  t.teardown(async () => {
    for (const release of waiting) release()
    await Promise.allSettled(held)
  })
  for (let i = 0; i < 40 && waiting.length < 1; i++) {
    const total = busy.received.length + idle.received.length
    held.push(send(proxy, `/hold/${i}`))
    await eventually(() => busy.received.length + idle.received.length > total, 3000)
  }
  t.ok(waiting.length >= 1, `a request is held on one endpoint (${waiting.length})`)
  const before = { busy: busy.received.length, idle: idle.received.length }
  for (let i = 0; i < 100; i++) t.equal((await send(proxy, `/new/${i}`)).status, 200)
  t.equal(busy.received.length - before.busy, 0, 'no new request went to the endpoint holding requests')
  t.equal(idle.received.length - before.idle, 100, 'every new request went to the idle one')
  for (const release of waiting.splice(0)) release()
  for (const r of await Promise.all(held)) t.equal(r.status, 200, 'held requests complete')
})

t.test('least_request with two endpoints always compares both (unit)', async (t) => {
  // Power of two choices draws two *distinct* endpoints; with two, that is both of them, so
  // the one with fewer requests in flight is always chosen.
  const config: UpstreamConfig = {
    name: 'app',
    endpoints: ['http://127.0.0.1:1', 'http://127.0.0.1:2'],
    critical: false,
    healthCheck: null,
    connectTimeoutMs: 1000,
    keepAliveTimeoutMs: 1000,
    connections: 1,
    balance: 'least_request',
    ejection: { consecutiveFailures: 7, baseMs: 1000, maxMs: 60000, panicThresholdPercent: 50 },
    failover: null,
    failbackAfterMs: 30000,
    tls: null
  }
  const endpoints = config.endpoints.map((o) => new Endpoint(o, new Pool(o)))
  t.teardown(async () => { for (const e of endpoints) await e.pool.close() })
  const balancer = new Balancer(config, endpoints, { onEject () {} })
  const [busy, idle] = endpoints as [Endpoint, Endpoint]
  busy.inFlight = 5
  let wrong = 0
  for (let i = 0; i < 10000; i++) if (balancer.pick(null) !== idle) wrong++
  t.equal(wrong, 0, `picks of the endpoint with 5 requests in flight over the idle one (${wrong} of 10000)`)
})

t.test('passive ejection after 7 consecutive failures, and traffic again after the penalty', async (t) => {
  const eps = await upstreams(t, [status(500), echo])
  const [bad, good] = eps as [TestUpstream, TestUpstream]
  // A penalty long enough (1.5 to 2.5 s with jitter) to check "no traffic while ejected" on a
  // busy machine, short enough to wait out.
  const { proxy, ops, logs } = await startTestSidecar(t, balanced(eps, { ejection: { baseMs: 2000, maxMs: 4000 } }))

  let samples = await scrape(ops)
  t.equal(sumOf(samples, 'breakwater_upstream_endpoints', { upstream: 'app', state: 'ready' }), 2, 'both ready at start')
  t.equal(sumOf(samples, 'breakwater_upstream_endpoints', { upstream: 'app', state: 'ejected' }), 0)

  // Round robin alternates; the 7th failure of `bad` ejects it.
  for (let i = 0; i < 14; i++) await send(proxy, `/a/${i}`)
  const ejectedAt = performance.now()
  t.equal(bad.received.length, 7, 'the failing endpoint saw 7 requests')
  const ejected = logs.find((l) => l.event === 'endpoint_ejected')
  t.ok(ejected, 'an endpoint_ejected log line')
  t.equal(ejected?.endpoint, bad.url)
  t.equal(ejected?.upstream, 'app')
  t.equal(ejected?.level, 'warn')
  t.equal(ejected?.consecutiveFailures, 7)
  t.ok(Number(ejected?.penaltyMs) >= 1500 && Number(ejected?.penaltyMs) <= 2500, `penalty about baseMs with jitter (${String(ejected?.penaltyMs)} ms)`)

  const badBefore = bad.received.length
  for (let i = 0; i < 10; i++) t.equal((await send(proxy, `/b/${i}`)).status, 200, 'only the healthy endpoint answers')
  samples = await scrape(ops)
  // An ejection lasts until its penalty is over: still ejected now means ejected for all 10.
  if (sumOf(samples, 'breakwater_upstream_endpoints', { upstream: 'app', state: 'ejected' }) === 1) {
    t.equal(bad.received.length, badBefore, 'no request reached the ejected endpoint')
    t.equal(sumOf(samples, 'breakwater_upstream_endpoints', { upstream: 'app', state: 'ready' }), 1)
  } else {
    // A machine so busy that 10 requests outlasted the penalty: only the ones sent before its end were kept away.
    t.ok(bad.received.length - badBefore <= 5, `the ejected endpoint got at most its share after the penalty (${bad.received.length - badBefore})`)
    t.comment(`the penalty ended before the check (${Math.round(performance.now() - ejectedAt)} ms after the ejection)`)
  }
  t.equal(sumOf(samples, 'breakwater_ejections_total', { upstream: 'app' }), 1, 'breakwater_ejections_total')

  t.ok(await eventually(async () => sumOf(await scrape(ops), 'breakwater_upstream_endpoints', { upstream: 'app', state: 'ready' }) === 2, 5000, 100), 'ready again after the penalty')
  for (let i = 0; i < 4; i++) await send(proxy, `/c/${i}`)
  t.ok(bad.received.length > badBefore, 'the ejected endpoint gets traffic again after its penalty')
  // Its probe failed: ejected again at once, for longer.
  t.ok(await eventually(() => logs.filter((l) => l.event === 'endpoint_ejected').length === 2, 2000), 'a failed probe ejects it again')
  const second = logs.filter((l) => l.event === 'endpoint_ejected')[1]
  t.ok(Number(second?.penaltyMs) >= 3000, `the penalty doubles, up to maxMs (${String(ejected?.penaltyMs)} → ${String(second?.penaltyMs)} ms)`)
  t.ok(Number(second?.penaltyMs) <= 4000 * 1.25, 'bounded by maxMs (with jitter)')
})

t.test('a recovered endpoint is cleared by one success', async (t) => {
  let failing = true
  const eps = await upstreams(t, [(req, res, body) => { if (failing) status(500)(req, res, body); else echo(req, res, body) }, echo])
  const [flaky] = eps as [TestUpstream, TestUpstream]
  const { proxy, ops } = await startTestSidecar(t, balanced(eps, { ejection: { baseMs: 300, maxMs: 1000 } }))
  for (let i = 0; i < 14; i++) await send(proxy, `/a/${i}`)
  t.equal(await (async () => sumOf(await scrape(ops), 'breakwater_ejections_total', { upstream: 'app' }))(), 1)
  failing = false
  await sleep(600)
  const before = flaky.received.length
  for (let i = 0; i < 10; i++) t.equal((await send(proxy, `/b/${i}`)).status, 200)
  t.ok(flaky.received.length - before >= 4, `back in rotation (${flaky.received.length - before} of 10)`)
  const samples = await scrape(ops)
  t.equal(sumOf(samples, 'breakwater_upstream_endpoints', { upstream: 'app', state: 'ready' }), 2)
  t.equal(sumOf(samples, 'breakwater_ejections_total', { upstream: 'app' }), 1, 'not ejected again')
})

t.test('panic: when every endpoint fails, traffic still goes to all of them', async (t) => {
  const eps = await upstreams(t, [status(500, 'zero'), status(500, 'one')])
  const [zero, one] = eps as [TestUpstream, TestUpstream]
  const { proxy, ops, logs } = await startTestSidecar(t, balanced(eps, { ejection: { baseMs: 5000, maxMs: 10000 } }))
  const replies: Reply[] = []
  for (let i = 0; i < 40; i++) replies.push(await send(proxy, `/p/${i}`))
  t.ok(replies.every((r) => r.status === 500 && r.headers['x-breakwater-error'] === undefined), 'every answer is the upstream\'s own 500, never a local refusal')
  t.equal(logs.filter((l) => l.event === 'endpoint_ejected').length, 2, 'both endpoints were ejected')
  const samples = await scrape(ops)
  t.equal(sumOf(samples, 'breakwater_upstream_endpoints', { upstream: 'app', state: 'ejected' }), 2)
  // After both were ejected (at most 7 + 7 + 7 requests), the rest were spread over both.
  const late = replies.slice(25).map((r) => r.body)
  t.ok(late.includes('zero') && late.includes('one'), `both endpoints still get traffic in panic (${late.join(',')})`)
  t.equal(zero.received.length + one.received.length, 40, 'every request reached an upstream')
})

t.test('panic: a retried GET goes to the other endpoint, not back to the one that just failed', async (t) => {
  // Both endpoints answer 503 (retryable) and are ejected for the whole test: panic. Answers are
  // held until two requests are in (or 300 ms), so the first attempts of two requests both go
  // out before either retry is chosen — the interleaving of real concurrent traffic.
  const held: Array<() => void> = []
  let timer: NodeJS.Timeout | undefined
  const release = (): void => { clearTimeout(timer); for (const answer of held.splice(0)) answer() }
  const paired = (label: string): Handler => (_req, res) => {
    held.push(() => { res.writeHead(503, { 'content-type': 'text/plain' }); res.end(label) })
    if (held.length >= 2) release()
    else { clearTimeout(timer); timer = setTimeout(release, 300) }
  }
  t.teardown(release)
  const eps = await upstreams(t, [paired('zero'), paired('one')])
  const { proxy, logs } = await startTestSidecar(t, balanced(eps, { ejection: { consecutiveFailures: 1, baseMs: 60_000, maxMs: 60_000 } }, { retries: { attempts: 1, budgetPercent: 100, minRetriesPerSecond: 1000 } }))
  await Promise.all([send(proxy, '/eject/0'), send(proxy, '/eject/1')])
  t.ok(await eventually(() => logs.filter((l) => l.event === 'endpoint_ejected').length === 2, 5000), 'both endpoints are ejected')
  for (const e of eps) e.received.length = 0

  for (let pair = 0; pair < 5; pair++) {
    const replies = await Promise.all([send(proxy, `/p/${pair}/a`), send(proxy, `/p/${pair}/b`)])
    for (const r of replies) t.equal(r.status, 503, 'the upstream\'s own 503 after its retry')
  }
  const paths = eps.flatMap((e, i) => e.received.map((r) => `${i} ${r.url}`))
  const twice = paths.filter((p, i) => paths.indexOf(p) !== i)
  t.same(twice, [], 'no request was sent twice to the same endpoint while another existed')
  for (let pair = 0; pair < 5; pair++) {
    for (const x of ['a', 'b']) t.equal(paths.filter((p) => p.endsWith(` /p/${pair}/${x}`)).length, 2, `/p/${pair}/${x}: two attempts, one on each endpoint`)
  }
})
