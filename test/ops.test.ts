import t from 'tap'
import { startUpstream, echo, type Handler } from './helpers/upstream.js'
import { startTestSidecar, oneRoute } from './helpers/sidecar.js'
import { send, getJson, eventually } from './helpers/http.js'

t.test('/health, /ready and /live answer 200 {status: ok}', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { ops } = await startTestSidecar(t, oneRoute(up.url))
  for (const path of ['/health', '/ready', '/live']) {
    const res = await fetch(`${ops}${path}`)
    t.equal(res.status, 200, `${path} 200`)
    t.match(res.headers.get('content-type') ?? '', /^application\/json/, `${path} is JSON`)
    t.same(await res.json(), { status: 'ok' }, `${path} body`)
  }
})

t.test('/metrics is Prometheus text with Breakwater and Node process metrics', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { ops, proxy } = await startTestSidecar(t, oneRoute(up.url))
  t.equal((await send(proxy, '/one')).status, 200)
  const res = await fetch(`${ops}/metrics`)
  t.equal(res.status, 200)
  t.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/)
  const text = await res.text()
  t.match(text, /^# TYPE breakwater_requests_total counter$/m)
  t.match(text, /^breakwater_requests_total\{route="root",upstream="app",code="200",source="upstream"\} 1$/m)
  t.match(text, /^# TYPE breakwater_request_duration_seconds histogram$/m)
  t.match(text, /^breakwater_request_duration_seconds_bucket\{route="root",upstream="app",le="\+Inf"\} 1$/m)
  t.match(text, /^breakwater_request_duration_seconds_count\{route="root",upstream="app"\} 1$/m)
  t.match(text, /^process_cpu_user_seconds_total \d/m, 'Node default process metrics')
  t.match(text, /^nodejs_eventloop_lag_seconds /m)
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue
    if (!/^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? (-?[0-9.e+-]+|NaN|[+-]Inf)$/.test(line)) t.fail(`not a valid sample line: ${line}`)
  }
})

t.test('the ops listener serves GET of its four paths and nothing else', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const { ops } = await startTestSidecar(t, oneRoute(up.url))
  for (const path of ['/', '/v1/state', '/healthz', '/metrics/extra', '/admin', '/health/']) {
    const res = await fetch(`${ops}${path}`)
    await res.text()
    t.equal(res.status, 404, `GET ${path} → 404`)
  }
  for (const [method, path] of [['POST', '/health'], ['PUT', '/ready'], ['DELETE', '/live'], ['POST', '/metrics'], ['PATCH', '/health']] as const) {
    const res = await fetch(`${ops}${path}`, { method, body: method === 'DELETE' ? undefined : '{}', headers: { 'content-type': 'application/json' } })
    await res.text()
    t.not(res.status, 200, `${method} ${path} is not served (${res.status})`)
    t.ok(res.status >= 400 && res.status < 500, `${method} ${path} → 4xx`)
  }
  t.equal(up.received.length, 0, 'nothing on the ops port reaches an upstream')
})

t.test('/v1/* on the proxy port is ordinary traffic, routed to the upstream', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const { proxy, ops } = await startTestSidecar(t, oneRoute(up.url))
  for (const path of ['/v1/state', '/health', '/metrics', '/live']) {
    const res = await send(proxy, path)
    t.equal(res.status, 200)
    t.equal(res.json<{ url: string }>().url, path, `${path} on the proxy port reached the upstream`)
  }
  const put = await send(proxy, '/v1/flags/x', { method: 'PUT', body: '{"enabled":false,"reason":"r"}' })
  t.equal(put.json<{ method: string, url: string }>().url, '/v1/flags/x', 'even a mutating-looking path is only proxied')
  t.equal((await getJson(`${ops}/v1/state`)).status, 404, 'the ops port does not serve /v1/state')
})

t.test('a critical upstream failing its active health check turns /health and /ready 503; /live stays 200', async (t) => {
  let healthy = true
  const app: Handler = (req, res, body) => {
    if (req.url === '/healthz') {
      res.writeHead(healthy ? 200 : 500, { 'content-type': 'text/plain' })
      res.end(healthy ? 'ok' : 'broken')
      return
    }
    echo(req, res, body)
  }
  const up = await startUpstream(app)
  t.teardown(up.close)
  const { ops, logs } = await startTestSidecar(t, oneRoute(up.url, {}, {
    critical: true,
    healthCheck: { path: '/healthz', intervalMs: 100, timeoutMs: 50, unhealthyThreshold: 2, healthyThreshold: 2 }
  }))
  const status = async (path: string): Promise<{ status: number, body: any }> => await getJson(`${ops}${path}`)

  t.ok(await eventually(() => up.received.filter((r) => r.url === '/healthz').length >= 2, 3000), 'the upstream is probed')
  t.ok(await eventually(async () => (await status('/health')).status === 200, 3000), 'healthy at first')
  t.same((await status('/health')).body, { status: 'ok' })
  const probe = up.received.find((r) => r.url === '/healthz')
  t.equal(probe?.method, 'GET', 'probes are GET requests')

  healthy = false
  t.ok(await eventually(async () => (await status('/health')).status === 503, 3000), '/health turns 503')
  const degraded = await status('/health')
  t.equal(degraded.body.status, 'degraded')
  t.match(JSON.stringify(degraded.body), /"app"/, 'the failing upstream is named')
  t.same(degraded.body.failingUpstreams, ['app'])
  t.equal((await status('/ready')).status, 503, '/ready too')
  t.same(await status('/live'), { status: 200, body: { status: 'ok' } }, '/live stays 200: the process is alive')
  t.ok(logs.some((l) => l.event === 'health_check_failing' && l.upstream === 'app' && l.level === 'warn'), 'a warn log line')

  healthy = true
  t.ok(await eventually(async () => (await status('/health')).status === 200, 3000), '/health recovers when the check passes again')
  t.same((await status('/ready')).body, { status: 'ok' })
  t.same(await status('/live'), { status: 200, body: { status: 'ok' } })
  t.ok(logs.some((l) => l.event === 'health_check_passing' && l.upstream === 'app'), 'recovery is logged')
})

t.test('a non-critical upstream failing its health check keeps /health 200', async (t) => {
  const app = await startUpstream(echo)
  t.teardown(app.close)
  const dep = await startUpstream((_req, res) => { res.writeHead(500); res.end() })
  t.teardown(dep.close)
  const { ops, logs } = await startTestSidecar(t, {
    upstreams: {
      app: { url: app.url, critical: true },
      dep: { url: dep.url, healthCheck: { path: '/healthz', intervalMs: 100, timeoutMs: 50, unhealthyThreshold: 2, healthyThreshold: 2 } }
    },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }]
  })
  t.ok(await eventually(() => logs.some((l) => l.event === 'health_check_failing' && l.upstream === 'dep'), 3000), 'the dependency is failing its checks')
  t.same(await getJson(`${ops}/health`), { status: 200, body: { status: 'ok' } }, '/health stays 200')
  t.same(await getJson(`${ops}/ready`), { status: 200, body: { status: 'ok' } }, '/ready stays 200')
  t.same(await getJson(`${ops}/live`), { status: 200, body: { status: 'ok' } })
})

t.test('the start-up line names the addresses bound: a wildcard ops listener is not logged as loopback', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const s = await startTestSidecar(t, { ...oneRoute(up.url), listen: { proxy: { host: '127.0.0.1', port: 0 }, ops: { host: '0.0.0.0', port: 0 }, admin: { host: '127.0.0.1', port: 0 } } })
  const line = s.logs.find((l) => l.msg === 'listening')
  t.match(String(line?.ops), /^http:\/\/0\.0\.0\.0:\d+$/, `ops bound to every interface, said so (${String(line?.ops)})`)
  t.match(String(line?.admin), /^http:\/\/127\.0\.0\.1:\d+$/, 'admin on loopback, said so')
  const port = new URL(String(line?.ops)).port
  t.equal((await fetch(`http://127.0.0.1:${port}/live`)).status, 200, 'and it answers there')
})
