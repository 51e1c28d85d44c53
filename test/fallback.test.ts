import t, { type Test } from 'tap'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type http from 'node:http'
import net from 'node:net'
import { get as httpGet } from 'node:http'
import { startUpstream, refusedUrl, type TestUpstream } from './helpers/upstream.js'
import { startTestSidecar, type TestSidecar } from './helpers/sidecar.js'
import { send, eventually, type Reply } from './helpers/http.js'
import { scrape, sumOf } from './helpers/metrics.js'
import { admin } from './helpers/admin.js'
import { resolveConfig, ConfigError } from '../src/config/load.js'
import { emptySums } from '../src/proxy/window.js'
import { PAGE_BYTES, type Fallback } from '../src/proxy/fallback.js'

type Mode = 'ok' | 'reset' | 'hang'

/**
 * An upstream whose answers depend on `state.mode` and the path: `/nostore`, `/private`,
 * `/cookie`, `/varystar`, `/vary` (on accept-language) and `/big/N` set what their names say;
 * `/echo-id` echoes the request's `x-request-id`, as apps and proxies in front of them do;
 * `/aged` comes with `Age: 100`.
 */
async function appUpstream (t: Test, state: { mode: Mode, bodyBytes?: number, held?: http.ServerResponse[] }): Promise<TestUpstream> {
  const up = await startUpstream((req, res) => {
    if (state.mode === 'reset') { req.socket.destroy(); return }
    if (state.mode === 'hang') { state.held?.push(res); return }
    const url = req.url ?? ''
    const headers: http.OutgoingHttpHeaders = { 'content-type': 'text/plain' }
    let body = `good ${url}`
    if (url === '/nostore') headers['cache-control'] = 'no-store'
    if (url === '/private') headers['cache-control'] = 'private, max-age=60'
    if (url === '/cookie') headers['set-cookie'] = 'session=1'
    if (url === '/varystar') headers.vary = '*'
    if (url === '/vary') { headers.vary = 'Accept-Language'; body += ` ${String(req.headers['accept-language'])}` }
    if (url.startsWith('/big/')) body = url.padEnd(state.bodyBytes ?? 10_000, '.')
    if (url === '/echo-id') headers['x-request-id'] = req.headers['x-request-id']
    // A cache in front of the app held this answer for 100 s already.
    if (url === '/aged') { headers.age = '100'; headers['cache-control'] = 'max-age=600' }
    // Answers that forbid being served stale (RFC 9111 §4.2.4), fresh for the seconds they say.
    const noStale: Record<string, string> = {
      '/no-cache': 'no-cache',
      '/must-revalidate': 'must-revalidate',
      '/proxy-revalidate': 'public, proxy-revalidate',
      '/s-maxage-passed': 's-maxage=50, max-age=600',
      '/must-revalidate-fresh': 'max-age=600, must-revalidate',
      '/s-maxage-fresh': 'max-age=0, s-maxage=600',
      '/must-revalidate-1s': 'must-revalidate, max-age=1'
    }
    if (noStale[url] !== undefined) headers['cache-control'] = noStale[url]
    if (url === '/s-maxage-passed') headers.age = '100'
    // Fresh by Expires minus Date alone (RFC 9111 §4.2.1): 600 s, 2 s, or expired already.
    const expiresIn: Record<string, number> = { '/expires-fresh': 600, '/expires-2s': 2, '/expires-passed': -60 }
    if (expiresIn[url] !== undefined) {
      const now = Math.floor(Date.now() / 1000) * 1000
      headers['cache-control'] = url === '/expires-2s' ? 'proxy-revalidate' : 'must-revalidate'
      headers.date = new Date(now).toUTCString()
      headers.expires = new Date(now + (expiresIn[url] as number) * 1000).toUTCString()
    }
    headers['content-length'] = Buffer.byteLength(body)
    res.writeHead(200, headers)
    res.end(body)
  })
  t.teardown(up.close)
  return up
}

/** The app behind one route whose only fallback is a stale one (1 minute); `state.mode` drives the app. */
async function staleSidecar (t: Test, extra: Record<string, unknown> = {}): Promise<{ state: { mode: Mode }, sc: TestSidecar }> {
  const state = { mode: 'ok' as Mode }
  const up = await appUpstream(t, state)
  const sc = await startTestSidecar(t, { upstreams: { app: { url: up.url } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app', fallback: { staleIfError: '1m' } }], ...extra })
  return { state, sc }
}

function routeFallback (sc: TestSidecar): Fallback {
  return (sc.sidecar.dataPlane.runtime.routes.routes[0] as { fallback: Fallback }).fallback
}

function isStale (t: Test, r: Reply, body: string, why: string): void {
  t.equal(r.status, 200, `${why}: 200`)
  t.equal(r.body, body, `${why}: the last good body`)
  t.equal(r.headers['x-breakwater-fallback'], 'stale', `${why}: marked stale`)
  t.match(String(r.headers.age), /^[0-9]+$/, `${why}: with Age`)
}

function isStatic (t: Test, r: Reply, why: string): void {
  t.equal(r.status, 503, `${why}: the static status`)
  t.equal(r.body, 'degraded', `${why}: the static body`)
  t.equal(r.headers['x-breakwater-fallback'], 'static', `${why}: marked static`)
}

const FALLBACK = { staleIfError: '1m', status: 503, body: 'degraded' }

t.test('fallback: the last good 200 is served with Age in place of each of the five refusals and failures', async (t) => {
  const state = { mode: 'ok' as Mode, held: [] as http.ServerResponse[] }
  const up = await appUpstream(t, state)
  const sc = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [
      // Short enough to time out a hanging request soon, long enough for the good answer below
      // to beat it on a loaded machine.
      { match: { pathPrefix: '/quick/' }, upstream: 'app', timeoutMs: 1500, fallback: FALLBACK },
      { match: { pathPrefix: '/' }, upstream: 'app', killSwitch: 'feat', fallback: FALLBACK }
    ],
    featureFlags: { feat: true },
    circuitBreakers: { app: { maxConcurrentRequests: 1, volumeThreshold: 1000 } }
  })
  const dp = sc.sidecar.dataPlane
  t.equal((await send(sc.proxy, '/item')).body, 'good /item', 'a good answer, stored')
  t.equal((await send(sc.proxy, '/quick/item')).body, 'good /quick/item', 'and one on the route with a short timeout')

  state.mode = 'reset'
  isStale(t, await send(sc.proxy, '/item'), 'good /item', 'upstream_unavailable')
  state.mode = 'hang'
  isStale(t, await send(sc.proxy, '/quick/item'), 'good /quick/item', 'upstream_timeout')
  state.mode = 'ok'
  dp.force('app', 'open')
  isStale(t, await send(sc.proxy, '/item'), 'good /item', 'circuit_open')
  dp.force('app', null)
  await sc.sidecar.flags.override('feat', false)
  isStale(t, await send(sc.proxy, '/item'), 'good /item', 'feature_disabled')
  await sc.sidecar.flags.override('feat', null)
  state.mode = 'hang'
  state.held.length = 0
  const slow = send(sc.proxy, '/slow') // holds the bulkhead's one slot until the upstream answers it
  t.ok(await eventually(() => state.held.length === 1), 'one request in flight')
  isStale(t, await send(sc.proxy, '/item'), 'good /item', 'bulkhead_full')
  state.held[0]?.end('slow done')
  t.equal((await slow).body, 'slow done', 'the request that held the slot completes')

  state.mode = 'reset'
  const head = await send(sc.proxy, '/item', { method: 'HEAD' })
  t.equal(head.headers['x-breakwater-fallback'], 'stale', 'HEAD is answered from the stored GET')
  t.equal(head.body, '')

  const samples = await scrape(sc.ops)
  t.equal(sumOf(samples, 'breakwater_fallbacks_total', { kind: 'stale' }), 6)
  t.equal(sumOf(samples, 'breakwater_fallbacks_total', { route: 'quick', kind: 'stale' }), 1, 'counted by route')
  t.equal(sumOf(samples, 'breakwater_fallbacks_total', { kind: 'static' }), 0)
  t.equal(sumOf(samples, 'breakwater_requests_total', { code: '200', source: 'breakwater' }), 6, 'stale answers are Breakwater\'s status')
  const lines = sc.logs.filter((l) => l.msg === 'request' && l.fallback === 'stale')
  t.same(lines.map((l) => `${String(l['error.type'])}/${String(l.outcome)}`), [
    'upstream_unavailable/upstream', 'upstream_timeout/upstream', 'circuit_open/breakwater', 'feature_disabled/breakwater', 'bulkhead_full/breakwater', 'upstream_unavailable/upstream'
  ], 'each keeps the cause of what it replaced (the access log says which)')
})

t.test('fallback: what HTTP caching does not allow is never stored; Vary is respected', async (t) => {
  const state = { mode: 'ok' as Mode }
  const up = await appUpstream(t, state)
  const sc = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', fallback: { ...FALLBACK, cache: { maxEntryBytes: 4096 } } }]
  })
  const paths = ['/nostore', '/private', '/cookie', '/varystar', '/big/1']
  for (const p of paths) t.equal((await send(sc.proxy, p)).status, 200, `${p} answered`)
  t.equal((await send(sc.proxy, '/auth', { headers: { authorization: 'Bearer x' } })).status, 200, '/auth answered')
  t.equal((await send(sc.proxy, '/vary', { headers: { 'accept-language': 'en' } })).body, 'good /vary en')
  t.equal((await send(sc.proxy, '/plain')).status, 200)
  t.equal(routeFallback(sc).cache?.size, 2, 'only /vary and /plain were stored')

  state.mode = 'reset'
  for (const p of [...paths, '/auth']) isStatic(t, await send(sc.proxy, p), `${p} not stored`)
  isStale(t, await send(sc.proxy, '/plain'), 'good /plain', 'a plain 200 was')
  isStale(t, await send(sc.proxy, '/vary', { headers: { 'accept-language': 'en' } }), 'good /vary en', 'Vary: the same accept-language')
  isStatic(t, await send(sc.proxy, '/vary', { headers: { 'accept-language': 'fr' } }), 'Vary: another accept-language is not served the stored variant')
  isStatic(t, await send(sc.proxy, '/vary'), 'Vary: no accept-language is another variant too')
})

t.test('fallback: a response to a request with Cache-Control: no-store is never stored (RFC 9111 §5.2.1.5)', async (t) => {
  const state = { mode: 'ok' as Mode }
  const up = await appUpstream(t, state)
  const sc = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', fallback: FALLBACK }]
  })
  t.equal((await send(sc.proxy, '/statement', { headers: { 'cache-control': 'no-cache, No-Store' } })).status, 200, 'answered')
  t.equal((await send(sc.proxy, '/plain', { headers: { 'cache-control': 'max-age=0' } })).status, 200, 'answered')
  t.equal(routeFallback(sc).cache?.size, 1, 'only the request without no-store was stored')
  state.mode = 'reset'
  isStatic(t, await send(sc.proxy, '/statement'), 'the no-store request\'s response was not kept')
  isStale(t, await send(sc.proxy, '/plain'), 'good /plain', 'another request directive does not stop storing')
})

t.test('fallback: a request that asks for a validated answer (no-cache, max-age=0, Pragma) gets none from the cache, unless it says stale-if-error', async (t) => {
  const { state, sc } = await staleSidecar(t)
  t.equal((await send(sc.proxy, '/page')).status, 200, 'stored')
  state.mode = 'reset'
  const refused: Array<Record<string, string>> = [
    { 'cache-control': 'no-cache' },
    { 'cache-control': 'max-age=0' },
    { 'cache-control': 'max-age=00, max-stale' },
    { pragma: 'no-cache' }
  ]
  for (const headers of refused) {
    const r = await send(sc.proxy, '/page', { headers })
    t.equal(r.status, 502, `${JSON.stringify(headers)}: the failure, not a stored answer (RFC 9111 §5.2.1)`)
    t.equal(r.headers['x-breakwater-fallback'], undefined, `${JSON.stringify(headers)}: not marked`)
  }
  const accepted: Array<Record<string, string>> = [
    {},
    { 'cache-control': 'no-cache, stale-if-error' },
    { 'cache-control': 'max-age=0, stale-if-error=3600' },
    { 'cache-control': 'max-age=3600' },
    { 'cache-control': 'max-age=3600', pragma: 'no-cache' }
  ]
  for (const headers of accepted) isStale(t, await send(sc.proxy, '/page', { headers }), 'good /page', JSON.stringify(headers))
  t.ok(await eventually(async () => (await send(sc.proxy, '/page', { headers: { 'cache-control': 'max-age=1' } })).status === 502, 10_000, 100), 'max-age=1: not once the entry is older than that')
  t.ok(await eventually(async () => (await send(sc.proxy, '/page', { headers: { 'cache-control': 'no-cache, stale-if-error=1' } })).status === 502, 10_000, 100), 'stale-if-error=1: not once more than 1 s stale')
})

t.test('fallback: an answer that forbids stale use (no-cache, must-revalidate, proxy-revalidate, s-maxage) is served only while fresh', async (t) => {
  const { state, sc } = await staleSidecar(t)
  const refused = ['/no-cache', '/must-revalidate', '/proxy-revalidate', '/s-maxage-passed']
  const fresh = ['/must-revalidate-fresh', '/s-maxage-fresh']
  for (const p of [...refused, ...fresh, '/must-revalidate-1s']) t.equal((await send(sc.proxy, p)).status, 200, `${p} answered`)
  state.mode = 'reset'
  for (const p of refused) t.equal((await send(sc.proxy, p)).status, 502, `${p}: the failure, not a stale answer`)
  for (const p of fresh) isStale(t, await send(sc.proxy, p), `good ${p}`, `${p}, still fresh by its own max-age or s-maxage,`)
  t.ok(await eventually(async () => (await send(sc.proxy, '/must-revalidate-1s')).status === 502, 10_000, 100), 'once past its max-age, must-revalidate is not served stale')
})

t.test('fallback: an answer that forbids stale use and is fresh by Expires alone is stored, and served while fresh (RFC 9111 §4.2.1)', async (t) => {
  const { state, sc } = await staleSidecar(t)
  for (const p of ['/expires-fresh', '/expires-2s', '/expires-passed']) t.equal((await send(sc.proxy, p)).status, 200, `${p} answered`)
  t.equal(routeFallback(sc).cache?.size, 2, 'the two still fresh by Expires were stored')
  state.mode = 'reset'
  isStale(t, await send(sc.proxy, '/expires-fresh'), 'good /expires-fresh', 'must-revalidate, Expires 600 s after Date')
  t.equal((await send(sc.proxy, '/expires-passed')).status, 502, 'Expires before Date: the failure')
  t.ok(await eventually(async () => (await send(sc.proxy, '/expires-2s')).status === 502, 10_000, 100), 'once past its Expires, proxy-revalidate is not served stale')
})

t.test('fallback: a stale answer carries the request id of the request it answers, once', async (t) => {
  const { state, sc } = await staleSidecar(t)
  const fresh = await send(sc.proxy, '/echo-id', { headers: { 'x-request-id': 'first-request' } })
  t.equal(fresh.headers['x-request-id'], 'first-request', 'the app echoes the id; stored')
  state.mode = 'reset'
  const stale = await send(sc.proxy, '/echo-id', { headers: { 'x-request-id': 'second-request' } })
  t.equal(stale.headers['x-breakwater-fallback'], 'stale')
  t.equal(stale.headers['x-request-id'], 'second-request', 'this request\'s id alone, not the stored one beside it')
  const line = sc.logs.find((l) => l.msg === 'request' && l.fallback === 'stale')
  t.equal(line?.requestId, 'second-request', 'the id the access log names')
})

t.test('fallback: one page is one entry however the client spells its host (case, a final dot)', async (t) => {
  const { state, sc } = await staleSidecar(t)
  t.equal((await send(sc.proxy, '/page', { headers: { host: 'shop.example' } })).status, 200, 'stored')
  state.mode = 'reset'
  for (const host of ['SHOP.example', 'shop.example.', 'Shop.Example.']) {
    isStale(t, await send(sc.proxy, '/page', { headers: { host } }), 'good /page', `Host: ${host}`)
  }
  t.equal(routeFallback(sc).cache?.size, 1, 'one entry')
})

t.test('fallback: a stale answer served after a failover says the cache answered, not the failover upstream', async (t) => {
  const state = { mode: 'ok' as Mode }
  const up = await appUpstream(t, state)
  const sc = await startTestSidecar(t, {
    upstreams: { app: { url: up.url, failover: 'dr' }, dr: { url: await refusedUrl() } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', fallback: { staleIfError: '1m' } }]
  })
  t.equal((await send(sc.proxy, '/page')).status, 200, 'stored')
  t.equal((await admin(sc.admin, 'PUT', '/v1/circuits/app', { state: 'open', reason: 'app is down' })).status, 200)
  const stale = await send(sc.proxy, '/page')
  isStale(t, stale, 'good /page', 'the failover upstream refused too')
  t.equal(stale.headers['x-breakwater-failover'], undefined, 'no failover header: dr did not answer')
  const line = sc.logs.find((l) => l.msg === 'request' && l.fallback === 'stale')
  t.equal(line?.upstream, 'dr', 'the access log still names the upstream that failed')
  const uncached = await send(sc.proxy, '/never-stored')
  t.equal(uncached.status, 502, 'nothing to serve: the failover upstream\'s failure')
  t.equal(uncached.headers['x-breakwater-failover'], 'dr', 'which names it')
})

t.test('fallback: a stale answer\'s Age counts the age it already had when stored', async (t) => {
  const { state, sc } = await staleSidecar(t)
  t.equal((await send(sc.proxy, '/aged')).headers.age, '100', 'the fresh answer carries the upstream\'s Age')
  state.mode = 'reset'
  const stale = await send(sc.proxy, '/aged')
  t.equal(stale.headers['x-breakwater-fallback'], 'stale')
  t.ok(Number(stale.headers.age) >= 100, `Age is at least the 100 s it had, plus its time here (${String(stale.headers.age)})`)
})

t.test('fallback: an entry older than staleIfError is not served', async (t) => {
  const state = { mode: 'ok' as Mode }
  const up = await appUpstream(t, state)
  const sc = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', fallback: { ...FALLBACK, staleIfError: '1s' } }]
  })
  t.equal((await send(sc.proxy, '/item')).status, 200)
  state.mode = 'reset'
  t.ok(await eventually(async () => (await send(sc.proxy, '/item')).headers['x-breakwater-fallback'] === 'static', 10_000, 100), 'once too old, the static answer')
})

t.test('fallback: a static response alone, from body or from a file read at load', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-fallback-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  writeFileSync(join(dir, 'degraded.html'), '<p>back soon</p>')
  const down = await refusedUrl()
  const sc = await startTestSidecar(t, {
    upstreams: { app: { url: down } },
    routes: [
      { match: { pathPrefix: '/file' }, upstream: 'app', fallback: { status: 503, file: join(dir, 'degraded.html'), contentType: 'text/html', headers: { 'Cache-Control': 'max-age=5' } } },
      { match: { pathPrefix: '/' }, upstream: 'app', fallback: { status: 200, body: 'degraded', headers: { 'Retry-After': '5' } } }
    ]
  })
  const r = await send(sc.proxy, '/x', { method: 'POST', body: 'payload' })
  t.equal(r.status, 200, 'any method, the configured status')
  t.equal(r.body, 'degraded')
  t.equal(r.headers['x-breakwater-fallback'], 'static')
  t.equal(r.headers['retry-after'], '5', 'configured headers')
  t.equal(r.headers['content-type'], 'text/plain; charset=utf-8')
  t.equal(r.headers['cache-control'], 'no-store', 'a cache in front never keeps the stand-in for the real page')
  const head = await send(sc.proxy, '/x', { method: 'HEAD' })
  t.equal(head.headers['cache-control'], 'no-store', 'nor its HEAD')
  const f = await send(sc.proxy, '/file')
  t.equal(f.status, 503)
  t.equal(f.body, '<p>back soon</p>')
  t.equal(f.headers['content-type'], 'text/html')
  t.equal(f.headers['cache-control'], 'max-age=5', 'a configured Cache-Control is the one sent, alone')
  const samples = await scrape(sc.ops)
  t.equal(sumOf(samples, 'breakwater_fallbacks_total', { kind: 'static' }), 3)
  t.equal(sumOf(samples, 'breakwater_requests_total', { code: '200', source: 'upstream' }), 0, 'never counted as the upstream\'s success')
})

t.test('fallback: the cache stays within maxBytes under many large bodies, least recently used evicted', async (t) => {
  const state = { mode: 'ok' as Mode, bodyBytes: 10_000 }
  const up = await appUpstream(t, state)
  const maxBytes = 64 * 1024
  const sc = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', fallback: { ...FALLBACK, cache: { maxBytes, maxEntryBytes: 16 * 1024 } } }]
  })
  const cache = routeFallback(sc).cache
  let peak = 0
  for (let i = 0; i < 60; i++) {
    t.equal((await send(sc.proxy, `/big/${i}`)).body.length, 10_000)
    peak = Math.max(peak, cache?.bytes ?? Infinity)
  }
  t.ok(peak <= maxBytes, `bytes never above maxBytes (peak ${peak})`)
  t.ok((cache?.size ?? 0) >= 5 && (cache?.size ?? 0) <= 6, `about maxBytes / body size entries held (${String(cache?.size)})`)
  t.ok((cache?.evictions ?? 0) >= 54, 'the rest were evicted')
  state.mode = 'reset'
  t.equal((await send(sc.proxy, '/big/59')).headers['x-breakwater-fallback'], 'stale', 'the most recent is kept')
  t.equal((await send(sc.proxy, '/big/0')).headers['x-breakwater-fallback'], 'static', 'the least recently used is gone')
})

t.test('fallback: bodies being captured at once hold at most maxBytes, and a capture given up lets go of its bytes', async (t) => {
  // Each response sends most of its body, then waits to be let go: all of them stream at once.
  const waiting: http.ServerResponse[] = []
  const up = await startUpstream((req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain' })
    res.write(Buffer.alloc(30 * 1024, 'a'))
    waiting.push(res)
  })
  t.teardown(up.close)
  const maxBytes = 64 * 1024
  const sc = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', fallback: { ...FALLBACK, cache: { maxBytes, maxEntryBytes: maxBytes } } }]
  })
  const cache = routeFallback(sc).cache as NonNullable<Fallback['cache']>
  const { port } = new URL(sc.proxy)
  let received = 0
  const done: Array<Promise<void>> = []
  for (let i = 0; i < 6; i++) {
    done.push(new Promise((resolve, reject) => {
      const req = httpGet({ host: '127.0.0.1', port, path: `/page/${i}` }, (res) => {
        res.on('data', (c: Buffer) => { received += c.length })
        res.on('end', resolve)
      })
      req.on('error', reject)
    }))
  }
  t.ok(await eventually(() => received >= 6 * 30 * 1024), 'six bodies stream at once')
  t.ok(cache.capturing <= maxBytes, `the bodies being captured hold at most maxBytes (${cache.capturing})`)
  for (const res of waiting) res.end('end')
  await Promise.all(done)
  t.equal(cache.capturing, 0, 'nothing is held once they ended')
  t.ok(cache.size >= 1, 'what was captured is stored')
  t.ok(cache.bytes <= maxBytes, 'and the cache stays within maxBytes')
})

t.test('fallback: the breaker still opens, and triggers still see the outage, while stale answers are served', async (t) => {
  const { state, sc } = await staleSidecar(t, { circuitBreakers: { app: { volumeThreshold: 4, failureThreshold: 0.5, recoveryTimeout: '1m' } } })
  t.equal((await send(sc.proxy, '/item')).status, 200)
  state.mode = 'reset'
  for (let i = 0; i < 8; i++) isStale(t, await send(sc.proxy, '/item'), 'good /item', `outage request ${i}`)
  const circuit = sc.sidecar.dataPlane.circuit('app')
  t.equal(circuit?.state, 'open', 'the failures behind the stale answers opened the circuit')
  const window = sc.sidecar.dataPlane.runtime.routes.routes[0]?.stats.window
  const sums = window?.sum(0, Math.floor(Date.now() / 1000) + 1, emptySums(false))
  t.equal(sums?.requests, 9, 'every request is in the trigger window')
  t.equal(sums?.errors, 8, 'each degraded answer is an error there (failures, then refusals by a circuit failures opened)')
  t.ok(sc.logs.some((l) => l.event === 'circuit_open' || l.msg === 'circuit open'), 'the circuit opening was logged')
})

t.test('validate: fallback file missing or too large, and incomplete fallbacks', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-fallback-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const big = join(dir, 'big.html')
  writeFileSync(big, Buffer.alloc(1024 * 1024 + 1, 'x'))
  const problems = (fallback: Record<string, unknown>): string[] => {
    try {
      resolveConfig({ service: 's', upstreams: { a: { url: 'http://127.0.0.1:1' } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'a', fallback }] })
    } catch (err) {
      t.type(err, ConfigError)
      return [...(err as ConfigError).problems]
    }
    t.fail('accepted')
    return []
  }
  const has = (fallback: Record<string, unknown>, re: RegExp): void => {
    const p = problems(fallback)
    t.ok(p.some((l) => re.test(l)), `${String(re)} in: ${p.join('; ')}`)
  }
  has({ status: 503, file: join(dir, 'missing.html') }, /^routes\[0\]\.fallback\.file: .*missing\.html does not exist/)
  has({ status: 503, file: big }, /^routes\[0\]\.fallback\.file: .*1048577 bytes, more than the 1048576/)
  has({ body: 'x' }, /^routes\[0\]\.fallback: needs staleIfError .* or status/)
  has({ body: 'x' }, /^routes\[0\]\.fallback\.body: needs status/)
  has({ status: 503, body: 'x', file: join(dir, 'missing.html') }, /^routes\[0\]\.fallback: use either body or file/)
  has({ status: 503, cache: { maxBytes: 4096 } }, /^routes\[0\]\.fallback\.cache: needs staleIfError/)
  has({ status: 503, headers: { 'Content-Length': '5' } }, /^routes\[0\]\.fallback\.headers\.Content-Length: set by Breakwater/)
  has({ status: 503, headers: { 'x-note': 'a\r\nb' } }, /^routes\[0\]\.fallback\.headers\.x-note: not a valid header value/)
  has({ status: 503, contentType: 'text/html\n' }, /^routes\[0\]\.fallback\.contentType: not a valid header value/)
})

t.test('validate: a static 2xx stand-in a route may give to a POST, PUT, PATCH or DELETE is a warning', async (t) => {
  const warned = (fallback: Record<string, unknown>, methods?: string[]): string[] => resolveConfig({
    service: 's',
    upstreams: { a: { url: 'http://127.0.0.1:1' } },
    routes: [{ match: { pathPrefix: '/', ...(methods !== undefined ? { methods } : {}) }, upstream: 'a', fallback }]
  }, { env: {} }).warnings.filter((w) => w.startsWith('routes[0].fallback'))
  const lines = warned({ status: 200, body: 'queued' })
  t.equal(lines.length, 1, `one warning: ${lines.join('; ')}`)
  t.match(lines[0], /^routes\[0\]\.fallback\.status: 200 is also the answer to unsafe methods \(POST, PUT, PATCH, DELETE\)/)
  t.match(warned({ status: 202, body: 'x' }, ['GET', 'post']), [/status: 202 is also the answer to unsafe methods \(POST\)/])
  t.same(warned({ status: 200, body: 'x' }, ['GET', 'HEAD']), [], 'a route of safe methods only: nothing to warn about')
  t.same(warned({ status: 503, body: 'x' }), [], 'a 5xx stand-in tells the client its request was not served')
  t.same(warned({ staleIfError: '1m' }), [], 'stale answers go to GET and HEAD only')
})

t.test('fallback: an entry evicted while a slow client reads it keeps its pages until the answer is written out', async (t) => {
  // Bodies far larger than the loopback socket buffers, one byte value each: an answer to a
  // client that does not read stays partly in the sidecar, and a page overwritten under it shows.
  const MiB = 1024 * 1024
  const bodyBytes = 16 * MiB
  const state = { ok: true }
  const bodies = new Map<string, Buffer>()
  const body = (url: string): Buffer => {
    let b = bodies.get(url)
    if (b === undefined) bodies.set(url, b = Buffer.alloc(bodyBytes, 0x61 + bodies.size))
    return b
  }
  const up = await startUpstream((req, res) => {
    if (!state.ok) { req.socket.destroy(); return }
    const b = body(req.url ?? '/')
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': b.length })
    res.end(b)
  })
  t.teardown(up.close)
  const maxBytes = 40 * MiB
  const sc = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', fallback: { ...FALLBACK, cache: { maxBytes, maxEntryBytes: bodyBytes } } }]
  })
  const route = sc.sidecar.dataPlane.runtime.routes.routes[0] as { fallback: Fallback, stats: { fallbacks: { stale: number } } }
  const cache = route.fallback.cache
  if (cache === null) throw new Error('no cache')
  const pages = Math.floor(maxBytes / PAGE_BYTES)
  t.equal((await send(sc.proxy, '/big/0')).body.length, bodyBytes, '/big/0 stored')

  state.ok = false
  const socket = net.connect(Number(new URL(sc.proxy).port), '127.0.0.1')
  t.teardown(() => { socket.destroy() })
  const received: Buffer[] = []
  socket.on('data', (c: Buffer) => received.push(c))
  const ended = new Promise<void>((resolve) => socket.on('end', resolve))
  socket.pause()
  socket.write(`GET /big/0 HTTP/1.1\r\nhost: ${new URL(sc.proxy).host}\r\nconnection: close\r\n\r\n`)
  t.ok(await eventually(() => route.stats.fallbacks.stale === 1), 'the slow client is being answered stale')

  state.ok = true
  t.equal((await send(sc.proxy, '/big/1')).body.length, bodyBytes, '/big/1 stored')
  t.equal((await send(sc.proxy, '/big/2')).body.length, bodyBytes, '/big/2 stored, /big/1 and /big/0 evicted')
  t.equal(cache.size, 1, 'one entry held')
  t.ok(cache.bytes <= maxBytes, `bytes within maxBytes while /big/0 is still being written (${cache.bytes})`)
  t.equal(cache.freePages, pages - 2 * bodyBytes / PAGE_BYTES, '/big/0\'s pages are not free yet')

  socket.resume()
  await ended
  const answer = Buffer.concat(received)
  const bodyAt = answer.indexOf('\r\n\r\n') + 4
  t.match(answer.subarray(0, bodyAt).toString('latin1'), /^HTTP\/1\.1 200 [^]*x-breakwater-fallback: stale/i, 'a stale 200')
  t.ok(answer.subarray(bodyAt).equals(body('/big/0')), 'the slow client got /big/0 whole, none of its pages overwritten')
  t.ok(await eventually(() => cache.freePages === pages - bodyBytes / PAGE_BYTES), 'then its pages are free, /big/2\'s alone held')
  state.ok = false
  const stale = await send(sc.proxy, '/big/2')
  t.equal(stale.headers['x-breakwater-fallback'], 'stale', '/big/2 answered stale')
  t.ok(Buffer.from(stale.body, 'latin1').equals(body('/big/2')), 'with its own body')
})
