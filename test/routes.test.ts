import t from 'tap'
import { startUpstream, type TestUpstream } from './helpers/upstream.js'
import { startTestSidecar } from './helpers/sidecar.js'
import { send } from './helpers/http.js'
import { scrape, sumOf, hasSample } from './helpers/metrics.js'
import type { Test } from 'tap'
import type { Dispatcher } from 'undici'

/** Upstreams `a` and `b`, each answering with its own name and the request it saw. */
async function twoUpstreams (t: Test): Promise<{ a: TestUpstream, b: TestUpstream }> {
  const named = (name: string) => async () => await startUpstream((req, res) => {
    const body = JSON.stringify({ upstream: name, url: req.url, host: req.headers.host })
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(body)
  })
  const a = await named('a')()
  t.teardown(a.close)
  const b = await named('b')()
  t.teardown(b.close)
  return { a, b }
}

interface Seen { upstream: string, url: string, host: string }

async function which (proxy: string, path: string, options: Partial<Dispatcher.RequestOptions> = {}): Promise<Seen> {
  const res = await send(proxy, path, options)
  if (res.status !== 200) return { upstream: `status ${res.status}`, url: '', host: '' }
  return res.json<Seen>()
}

t.test('first match wins', async (t) => {
  const { a, b } = await twoUpstreams(t)
  const { proxy } = await startTestSidecar(t, {
    upstreams: { a: { url: a.url }, b: { url: b.url } },
    routes: [
      { match: { pathPrefix: '/api' }, upstream: 'a' },
      { match: { pathPrefix: '/api/special' }, upstream: 'b' },
      { match: { pathPrefix: '/' }, upstream: 'b' }
    ]
  })
  t.equal((await which(proxy, '/api/special/x')).upstream, 'a', 'the earlier, broader route wins over a later, more specific one')
  t.equal((await which(proxy, '/api')).upstream, 'a')
  t.equal((await which(proxy, '/other')).upstream, 'b')
})

t.test('path (exact) versus pathPrefix', async (t) => {
  const { a, b } = await twoUpstreams(t)
  const { proxy } = await startTestSidecar(t, {
    upstreams: { a: { url: a.url }, b: { url: b.url } },
    routes: [
      { match: { path: '/exact' }, upstream: 'a' },
      { match: { pathPrefix: '/' }, upstream: 'b' }
    ]
  })
  t.equal((await which(proxy, '/exact')).upstream, 'a')
  t.equal((await which(proxy, '/exact?q=1')).upstream, 'a', 'the query does not count against an exact path')
  t.equal((await which(proxy, '/exact/')).upstream, 'a', 'one trailing slash is ignored (SPEC §15)')
  t.equal((await which(proxy, '/EXACT;v=1')).upstream, 'a', 'so are case and ; parameters')
  t.equal((await which(proxy, '/exact/more')).upstream, 'b')
  t.equal((await which(proxy, '/exactly')).upstream, 'b')
  t.equal((await which(proxy, '/ex')).upstream, 'b')
})

t.test('methods', async (t) => {
  const { a, b } = await twoUpstreams(t)
  const { proxy } = await startTestSidecar(t, {
    upstreams: { a: { url: a.url }, b: { url: b.url } },
    routes: [
      { match: { pathPrefix: '/m', methods: ['POST', 'put'] }, upstream: 'a' },
      { match: { pathPrefix: '/' }, upstream: 'b' }
    ]
  })
  t.equal((await which(proxy, '/m', { method: 'POST', body: 'x' })).upstream, 'a')
  t.equal((await which(proxy, '/m', { method: 'PUT', body: 'x' })).upstream, 'a', 'methods in config are case-insensitive')
  t.equal((await which(proxy, '/m')).upstream, 'b', 'GET is not listed')
  t.equal((await which(proxy, '/m', { method: 'DELETE' })).upstream, 'b')
})

t.test('host, with and without a port in the Host header', async (t) => {
  const { a, b } = await twoUpstreams(t)
  const { proxy } = await startTestSidecar(t, {
    upstreams: { a: { url: a.url }, b: { url: b.url } },
    routes: [
      { match: { pathPrefix: '/', host: 'api.example' }, upstream: 'a' },
      { match: { pathPrefix: '/', host: 'ported.example:8443' }, upstream: 'a' },
      { match: { pathPrefix: '/' }, upstream: 'b' }
    ]
  })
  const host = async (h: string): Promise<string> => (await which(proxy, '/h', { headers: { host: h } })).upstream
  t.equal(await host('api.example'), 'a')
  t.equal(await host('api.example:8080'), 'a', 'a port in the Host header is ignored when the route names none')
  t.equal(await host('API.Example'), 'a', 'host names are case-insensitive')
  t.equal(await host('other.example'), 'b')
  t.equal(await host('api.example.evil'), 'b')
  t.equal(await host('sub.api.example'), 'b')
  t.equal(await host('ported.example:8443'), 'a', 'a route that names a port matches it')
  t.equal(await host('ported.example:9000'), 'b', '… and only it')
  const seen = await which(proxy, '/h', { headers: { host: 'api.example:8080' } })
  t.equal(seen.host, 'api.example:8080', 'the Host header is forwarded as sent')
})

t.test('headers: exact values', async (t) => {
  const { a, b } = await twoUpstreams(t)
  const { proxy } = await startTestSidecar(t, {
    upstreams: { a: { url: a.url }, b: { url: b.url } },
    routes: [
      { match: { pathPrefix: '/', headers: { 'X-Tenant': 'blue', 'x-canary': '1' } }, upstream: 'a' },
      { match: { pathPrefix: '/' }, upstream: 'b' }
    ]
  })
  t.equal((await which(proxy, '/t', { headers: { 'x-tenant': 'blue', 'x-canary': '1' } })).upstream, 'a')
  t.equal((await which(proxy, '/t', { headers: { 'X-TENANT': 'blue', 'X-Canary': '1' } })).upstream, 'a', 'header names are case-insensitive')
  t.equal((await which(proxy, '/t', { headers: { 'x-tenant': 'Blue', 'x-canary': '1' } })).upstream, 'b', 'values are exact')
  t.equal((await which(proxy, '/t', { headers: { 'x-tenant': 'blue-green', 'x-canary': '1' } })).upstream, 'b', 'not a prefix match')
  t.equal((await which(proxy, '/t', { headers: { 'x-tenant': 'blue' } })).upstream, 'b', 'every listed header must match')
  t.equal((await which(proxy, '/t')).upstream, 'b')
})

t.test('rewritePrefix replaces the matched prefix and keeps the query', async (t) => {
  const { a, b } = await twoUpstreams(t)
  const { proxy } = await startTestSidecar(t, {
    upstreams: { a: { url: a.url }, b: { url: b.url } },
    routes: [
      { match: { pathPrefix: '/api/v1' }, upstream: 'b', rewritePrefix: '/v2' },
      { match: { pathPrefix: '/api' }, upstream: 'a', rewritePrefix: '/' }
    ]
  })
  const url = async (p: string): Promise<string> => (await which(proxy, p)).url
  t.equal(await url('/api/users'), '/users')
  t.equal(await url('/api/users?page=2&x=%41'), '/users?page=2&x=%41')
  t.equal(await url('/api'), '/')
  t.equal(await url('/api/'), '/')
  t.equal(await url('/api?q=1'), '/?q=1')
  t.equal(await url('/api/v1/items'), '/v2/items')
  t.equal(await url('/api/v1/items?sort=desc'), '/v2/items?sort=desc')
  t.equal(await url('/api/v1'), '/v2')
  t.equal(await url('/api/v1/'), '/v2/')
  t.equal(await url('/api/v1?x=1'), '/v2?x=1')
  t.equal(await url('/api//v1/../users'), '/users', 'the rewrite applies to the normalised path')
  t.equal(await url('/API/Users'), '/Users', 'a prefix matched in another case is cut by its length; the rest keeps its spelling')
  t.equal(await url('/x/..;/api/users'), '/users', 'a prefix found only once ; parameters are gone is cut from that path')
  t.equal(await url('/API/V1/items/'), '/v2/items/')
})

t.test('the route metric label is the route\'s name, or a name derived from its match', async (t) => {
  const { a, b } = await twoUpstreams(t)
  const { proxy, ops } = await startTestSidecar(t, {
    upstreams: { a: { url: a.url }, b: { url: b.url } },
    routes: [
      { name: 'orders', match: { pathPrefix: '/orders' }, upstream: 'a' },
      { match: { pathPrefix: '/api/v1' }, upstream: 'b' },
      { match: { pathPrefix: '/' }, upstream: 'b' }
    ]
  })
  await which(proxy, '/orders/123')
  await which(proxy, '/orders/456?x=1')
  await which(proxy, '/api/v1/users/42')
  await which(proxy, '/something/else')
  const samples = await scrape(ops)
  t.equal(sumOf(samples, 'breakwater_requests_total', { route: 'orders', upstream: 'a', code: '200' }), 2, 'named route')
  t.equal(sumOf(samples, 'breakwater_requests_total', { route: 'api_v1', upstream: 'b', code: '200' }), 1, 'derived from pathPrefix /api/v1')
  t.equal(sumOf(samples, 'breakwater_requests_total', { route: 'root', upstream: 'b', code: '200' }), 1, 'derived from pathPrefix /')
  t.ok(hasSample(samples, 'breakwater_request_duration_seconds_count', { route: 'orders', upstream: 'a' }))
  const routeLabels = new Set(samples.filter((s) => s.name === 'breakwater_requests_total').map((s) => s.labels.route))
  for (const label of routeLabels) t.notMatch(String(label), /\//, `route label "${String(label)}" is never a raw path`)
  const text = await (await fetch(`${ops}/metrics`)).text()
  t.match(text, /^breakwater_requests_total\{route="orders",upstream="a",code="200",source="upstream"\} 2$/m, 'the exposition line as Prometheus scrapes it')
})
