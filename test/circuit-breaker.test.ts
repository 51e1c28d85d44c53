import t, { type Test } from 'tap'
import { startUpstream, status, delay, hang } from './helpers/upstream.js'
import { startTestSidecar } from './helpers/sidecar.js'
import { send, getJson, sleep, eventually } from './helpers/http.js'
import type { Sidecar } from '../src/sidecar.js'

/** An upstream whose status can be switched while the test runs. */
async function switchable (t: Test, initial = 200): Promise<{ url: string, set: (code: number) => void, hits: () => number, close: () => Promise<void> }> {
  let code = initial
  const up = await startUpstream((_req, res) => { res.writeHead(code, { 'content-type': 'text/plain' }); res.end(`upstream ${code}`) })
  t.teardown(up.close)
  return { url: up.url, set: (c) => { code = c }, hits: () => up.received.length, close: up.close }
}

function config (url: string, breaker: Record<string, unknown>, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    upstreams: { pay: { url } },
    routes: [{ name: 'pay', match: { pathPrefix: '/' }, upstream: 'pay' }],
    circuitBreakers: { pay: breaker },
    ...extra
  }
}

async function fire (proxy: string, n: number, path = '/'): Promise<number[]> {
  const out: number[] = []
  for (let i = 0; i < n; i++) out.push((await send(proxy, path)).status)
  return out
}

function circuitOf (sidecar: Sidecar, upstream = 'pay'): any {
  return sidecar.dataPlane.circuit(upstream)
}

t.test('trap: opossum volumeThreshold defaults to 0 — ours is 20, so one failure never opens', async (t) => {
  const up = await switchable(t, 500)
  const { sidecar, proxy } = await startTestSidecar(t, config(up.url, {}))
  t.same(await fire(proxy, 1), [500], 'the upstream 5xx is relayed')
  t.equal(circuitOf(sidecar).state, 'closed', 'one failure in an empty window does not open')
  await fire(proxy, 18)
  t.equal(circuitOf(sidecar).state, 'closed', '19 requests are under the volume threshold')
  await fire(proxy, 1)
  t.equal(circuitOf(sidecar).state, 'open', 'the 20th failure opens it')
  const hits = up.hits()
  const refused = await send(proxy, '/')
  t.equal(refused.status, 503)
  t.equal(refused.json().error, 'circuit_open')
  t.equal(refused.headers['x-breakwater-mitigation'], 'circuit-open')
  t.equal(refused.headers['x-breakwater-error'], 'circuit_open')
  t.match(refused.headers['retry-after'], /^\d+$/)
  t.ok(Number(refused.headers['retry-after']) >= 1 && Number(refused.headers['retry-after']) <= 30, 'retry-after is the time left until half-open')
  t.equal(up.hits(), hits, 'the upstream saw no request while open')
})

t.test('trap: opossum compares with a strict >; a ratio that reaches failureThreshold opens', async (t) => {
  const up = await switchable(t)
  const { sidecar, proxy } = await startTestSidecar(t, config(up.url, { failureThreshold: 0.5, volumeThreshold: 10 }))
  for (let i = 0; i < 10; i++) {
    up.set(i % 2 === 0 ? 200 : 500)
    await send(proxy, '/')
  }
  t.equal(circuitOf(sidecar).state, 'open', 'exactly 50 % failures over 10 requests opens a 0.5 threshold')
})

t.test('half-open admits one probe: success closes, failure re-opens; the window is fresh after closing', async (t) => {
  const up = await switchable(t, 500)
  const { sidecar, proxy, logs } = await startTestSidecar(t, config(up.url, { volumeThreshold: 4, recoveryTimeout: 300 }))
  await fire(proxy, 4)
  t.equal(circuitOf(sidecar).state, 'open')
  await sleep(400)
  t.equal(circuitOf(sidecar).state, 'half-open')
  t.equal((await getJson(`${(await startTestSidecarOps(sidecar))}/metrics`)).status, 200)
  const probe = await send(proxy, '/')
  t.equal(probe.status, 500, 'the probe reached the upstream')
  t.equal(circuitOf(sidecar).state, 'open', 'a failed probe re-opens')
  await sleep(400)
  up.set(200)
  t.equal((await send(proxy, '/')).status, 200)
  t.equal(circuitOf(sidecar).state, 'closed', 'a good probe closes')
  // trap: opossum keeps the old failures in its window after closing; one failure would re-open.
  up.set(500)
  t.equal((await send(proxy, '/')).status, 500)
  t.equal(circuitOf(sidecar).state, 'closed', 'one failure after recovery does not re-open')
  t.equal(circuitOf(sidecar).windowRequests, 1, 'the window only holds requests since the close')
  const events = logs.filter((l) => typeof l.event === 'string' && (l.event as string).startsWith('circuit_')).map((l) => l.event)
  t.same(events, ['circuit_open', 'circuit_half_open', 'circuit_open', 'circuit_half_open', 'circuit_closed'], 'transitions logged at warn with event')
  t.ok(logs.filter((l) => l.event === 'circuit_open').every((l) => l.level === 'warn'))
})

async function startTestSidecarOps (sidecar: Sidecar): Promise<string> {
  return sidecar.addresses.ops
}

t.test('half-open lets exactly one probe through; others are refused while it is in flight', async (t) => {
  let hold = false
  // The probe's answer waits here until the second request has been refused.
  const held: Array<() => void> = []
  const up = await startUpstream((_req, res) => {
    if (hold) held.push(() => { res.writeHead(200); res.end('ok') })
    else { res.writeHead(500); res.end('no') }
  })
  t.teardown(up.close)
  const { sidecar, proxy } = await startTestSidecar(t, config(up.url, { volumeThreshold: 2, recoveryTimeout: 200 }))
  await fire(proxy, 2)
  t.ok(await eventually(() => circuitOf(sidecar).state === 'half-open'), 'half-open after recoveryTimeout')
  hold = true
  const before = up.received.length
  const probe = send(proxy, '/')
  t.ok(await eventually(() => held.length === 1), 'the probe reached the upstream')
  const other = await send(proxy, '/')
  t.equal(other.status, 503, 'a second request during the probe is refused')
  for (const answer of held) answer()
  t.equal((await probe).status, 200)
  t.equal(up.received.length - before, 1, 'only the probe reached the upstream')
  t.equal(circuitOf(sidecar).state, 'closed')
})

t.test('4xx responses and client aborts are not failures', async (t) => {
  const up = await switchable(t, 404)
  const { sidecar, proxy } = await startTestSidecar(t, config(up.url, { volumeThreshold: 5 }))
  t.same(await fire(proxy, 10), Array(10).fill(404))
  t.equal(circuitOf(sidecar).state, 'closed')
  t.equal(circuitOf(sidecar).failureRate, 0)
})

t.test('connect errors and timeouts are failures', async (t) => {
  const up = await startUpstream(hang)
  t.teardown(up.close)
  const { sidecar, proxy } = await startTestSidecar(t, {
    upstreams: { pay: { url: up.url }, gone: { url: 'http://127.0.0.1:1' } },
    routes: [
      { name: 'slow', match: { pathPrefix: '/slow' }, upstream: 'pay', timeoutMs: 100 },
      { name: 'gone', match: { pathPrefix: '/gone' }, upstream: 'gone' }
    ],
    circuitBreakers: { pay: { volumeThreshold: 3 }, gone: { volumeThreshold: 3 } }
  })
  t.same(await fire(proxy, 3, '/slow'), [504, 504, 504])
  t.equal(circuitOf(sidecar, 'pay').state, 'open', 'timeouts opened it')
  t.same(await fire(proxy, 3, '/gone'), [502, 502, 502])
  t.equal(circuitOf(sidecar, 'gone').state, 'open', 'connect errors opened it')
})

t.test('trap: opossum timeouts share one AbortController — ours are per request, by undici', async (t) => {
  const up = await startUpstream((req, res, body) => {
    if (req.url === '/hang') return
    delay(500)(req, res, body)
  })
  t.teardown(up.close)
  const { sidecar, proxy } = await startTestSidecar(t, {
    upstreams: { pay: { url: up.url } },
    routes: [
      { name: 'short', match: { path: '/hang' }, upstream: 'pay', timeoutMs: 150 },
      { name: 'long', match: { pathPrefix: '/' }, upstream: 'pay', timeoutMs: 5000 }
    ],
    circuitBreakers: { pay: {} }
  })
  const [slowOk, timedOut] = await Promise.all([send(proxy, '/slow'), send(proxy, '/hang')])
  t.equal(timedOut.status, 504, 'the short route timed out')
  t.equal(slowOk.status, 200, 'a concurrent request through the same breaker was not aborted by it')
  t.equal(circuitOf(sidecar).breaker.options.timeout, false, 'opossum runs no timer per call')
})

t.test('trap: rolling percentiles are off, so failures never sort a latency window', async (t) => {
  const up = await switchable(t, 500)
  const { sidecar, proxy } = await startTestSidecar(t, config(up.url, { volumeThreshold: 1000 }))
  await fire(proxy, 30)
  const breaker = circuitOf(sidecar).breaker
  t.equal(breaker.options.rollingPercentilesEnabled, false)
  t.equal(breaker.stats.latencyTimes.length, 0, 'no latency samples are kept in the window')
  t.equal(breaker.stats.failures, 30)
})

t.test('trap: bulkhead refusals never reach opossum, so they cannot open the circuit', async (t) => {
  const up = await startUpstream(delay(300, status(200)))
  t.teardown(up.close)
  const { sidecar, proxy, ops } = await startTestSidecar(t, config(up.url, { maxConcurrentRequests: 2, volumeThreshold: 2 }))
  const results = await Promise.all(Array.from({ length: 8 }, async () => await send(proxy, '/')))
  const statuses = results.map((r) => r.status).sort()
  t.same(statuses, [200, 200, 503, 503, 503, 503, 503, 503])
  const refused = results.find((r) => r.status === 503)
  t.equal(refused?.json().error, 'bulkhead_full')
  t.equal(refused?.headers['x-breakwater-mitigation'], 'bulkhead')
  t.equal(circuitOf(sidecar).state, 'closed', 'six bulkhead refusals did not open the circuit')
  t.equal(circuitOf(sidecar).windowRequests, 2, 'opossum saw only the two admitted requests')
  const metrics = await (await fetch(`${ops}/metrics`)).text()
  t.match(metrics, /breakwater_rejections_total\{route="pay",reason="bulkhead"\} 6/)
  t.equal(up.received.length, 2)
})

t.test('forced states: open refuses, closed bypasses, auto hands back', async (t) => {
  const up = await switchable(t, 500)
  const { sidecar, proxy, ops } = await startTestSidecar(t, config(up.url, { volumeThreshold: 2 }))
  t.ok(sidecar.dataPlane.force('pay', 'open'))
  const hits = up.hits()
  const refused = await send(proxy, '/')
  t.equal(refused.status, 503)
  t.equal(refused.json().error, 'circuit_open')
  t.equal(up.hits(), hits)
  t.match(await (await fetch(`${ops}/metrics`)).text(), /breakwater_circuit_state\{upstream="pay"\} 2/)
  sidecar.dataPlane.force('pay', 'closed')
  t.same(await fire(proxy, 5), [500, 500, 500, 500, 500], 'forced closed lets everything through')
  t.equal(circuitOf(sidecar).automaticState, 'closed', 'and nothing was counted while forced')
  sidecar.dataPlane.force('pay', null)
  await fire(proxy, 2)
  t.equal(circuitOf(sidecar).state, 'open', 'auto again: failures open it')
  t.notOk(sidecar.dataPlane.force('nope', 'open'), 'unknown upstream')
})

t.test('only upstreams listed in circuitBreakers get a breaker', async (t) => {
  const up = await switchable(t, 500)
  const { sidecar, proxy } = await startTestSidecar(t, { upstreams: { app: { url: up.url } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }] })
  t.same(await fire(proxy, 30), Array(30).fill(500), 'a failing app without a breaker keeps being tried')
  t.equal(sidecar.dataPlane.circuit('app'), undefined)
})

t.test('health policy: critical (default), any, never; half-open counts as healthy', async (t) => {
  const up = await switchable(t, 500)
  const critical = await startTestSidecar(t, {
    upstreams: { app: { url: up.url, critical: true }, pay: { url: up.url } },
    routes: [{ match: { pathPrefix: '/app' }, upstream: 'app' }, { match: { pathPrefix: '/' }, upstream: 'pay' }],
    // Long enough for the three probes of the open state below on a loaded machine.
    circuitBreakers: { app: { volumeThreshold: 2, recoveryTimeout: 2000 }, pay: { volumeThreshold: 2 } }
  })
  await fire(critical.proxy, 2, '/pay')
  t.equal((await getJson(`${critical.ops}/health`)).status, 200, 'a non-critical open circuit keeps /health 200')
  await fire(critical.proxy, 2, '/app')
  const degraded = await getJson(`${critical.ops}/health`)
  t.equal(degraded.status, 503)
  t.same(degraded.body, { status: 'degraded', reason: 'Circuit breakers active', openCircuits: ['app'] })
  t.equal((await getJson(`${critical.ops}/ready`)).status, 503)
  t.equal((await getJson(`${critical.ops}/live`)).status, 200, '/live never consults upstreams')
  t.ok(await eventually(() => circuitOf(critical.sidecar, 'app').state === 'half-open'))
  t.equal((await getJson(`${critical.ops}/health`)).status, 200, 'half-open is healthy')

  const any = await startTestSidecar(t, { ...config(up.url, { volumeThreshold: 2 }), health: { failOnOpenCircuit: 'any' } })
  await fire(any.proxy, 2)
  t.same((await getJson(`${any.ops}/health`)).body.openCircuits, ['pay'])

  const never = await startTestSidecar(t, {
    upstreams: { pay: { url: up.url, critical: true } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'pay' }],
    circuitBreakers: { pay: { volumeThreshold: 2 } },
    health: { failOnOpenCircuit: 'never' }
  })
  await fire(never.proxy, 2)
  t.equal(circuitOf(never.sidecar).state, 'open')
  t.equal((await getJson(`${never.ops}/health`)).status, 200)
})

t.test('metrics: circuit state gauge and rejections by route and reason', async (t) => {
  const up = await switchable(t, 503)
  const { proxy, ops } = await startTestSidecar(t, config(up.url, { volumeThreshold: 2 }))
  let metrics = await (await fetch(`${ops}/metrics`)).text()
  t.match(metrics, /breakwater_circuit_state\{upstream="pay"\} 0/)
  await fire(proxy, 5)
  metrics = await (await fetch(`${ops}/metrics`)).text()
  t.match(metrics, /breakwater_circuit_state\{upstream="pay"\} 2/)
  t.match(metrics, /breakwater_rejections_total\{route="pay",reason="circuit_open"\} 3/)
  // The same status, told apart by who produced it: the upstream's two, Breakwater's three refusals.
  t.match(metrics, /breakwater_requests_total\{route="pay",upstream="pay",code="503",source="upstream"\} 2/)
  t.match(metrics, /breakwater_requests_total\{route="pay",upstream="pay",code="503",source="breakwater"\} 3/)
})

t.test('config: a breaker for an unknown upstream is an error naming the key', async (t) => {
  const { resolveConfig, ConfigError } = await import('../src/config/load.js')
  let problems: readonly string[] = []
  try {
    resolveConfig({ service: 's', upstreams: { a: { url: 'http://127.0.0.1:1' } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'a' }], circuitBreakers: { b: {}, a: { failureThreshold: 2 } } })
  } catch (err) {
    t.type(err, ConfigError)
    problems = (err as InstanceType<typeof ConfigError>).problems
  }
  t.ok(problems.includes('circuitBreakers.a.failureThreshold: must be <= 1'), problems.join('\n'))
  t.ok(problems.some((p) => p.startsWith('circuitBreakers.b: unknown upstream')))
})
