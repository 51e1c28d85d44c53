import t from 'tap'
import { startUpstream, echo } from './helpers/upstream.js'
import { startTestSidecar, oneRoute, testSidecarInput, type TestSidecar } from './helpers/sidecar.js'
import { send, eventually } from './helpers/http.js'
import { admin } from './helpers/admin.js'
import { scrape, sumOf } from './helpers/metrics.js'
import { resolveConfig, ConfigError } from '../src/config/load.js'
import type { RateLimiter } from '../src/proxy/rate-limit.js'

/** A rate so slow that no token comes back during a test: refusals are counted, never timed. */
const FROZEN = 0.001

function limiter (sc: TestSidecar): RateLimiter | null {
  return (sc.sidecar.dataPlane.runtime.routes.routes[0] as { rateLimiter: RateLimiter | null }).rateLimiter
}

async function statuses (base: string, n: number, headers: Record<string, string> = {}): Promise<number[]> {
  return (await Promise.all(Array.from({ length: n }, async (_, i) => await send(base, `/r/${i}`, { headers })))).map((r) => r.status)
}

t.test('rateLimit: a burst of N+k requests gets exactly k refusals, 429 rate_limited with the rate-limit headers', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const sc = await startTestSidecar(t, oneRoute(up.url, { rateLimit: { requestsPerSecond: FROZEN, burst: 5 } }))
  const got = await statuses(sc.proxy, 8)
  t.equal(got.filter((s) => s === 200).length, 5, 'the burst is served')
  t.equal(got.filter((s) => s === 429).length, 3, 'exactly the excess is refused')
  t.equal(up.received.length, 5, 'refusals never reach the upstream')

  const refused = await send(sc.proxy, '/again')
  t.equal(refused.status, 429)
  t.equal(refused.json<{ error: string }>().error, 'rate_limited')
  t.equal(refused.headers['x-breakwater-error'], 'rate_limited')
  t.equal(refused.headers['x-breakwater-mitigation'], 'rate-limit')
  const retryAfter = Number(refused.headers['retry-after'])
  t.ok(Number.isInteger(retryAfter) && retryAfter >= 1, `retry-after is whole seconds (${String(refused.headers['retry-after'])})`)
  // draft-ietf-httpapi-ratelimit-headers: a List of policy items with q (quota) and w (window).
  t.equal(refused.headers['ratelimit-policy'], `"root";q=5;w=${Math.ceil(5 / FROZEN)}`)
  t.equal(refused.headers.ratelimit, `"root";r=0;t=${retryAfter}`)

  const samples = await scrape(sc.ops)
  t.equal(sumOf(samples, 'breakwater_rejections_total', { route: 'root', reason: 'rate_limit' }), 4, 'counted as rejections')
  t.equal(sumOf(samples, 'breakwater_requests_total', { code: '429', source: 'breakwater' }), 4, 'source="breakwater"')
  t.equal(sumOf(samples, 'breakwater_requests_total', { code: '429', source: 'upstream' }), 0, 'never the app\'s status')
  t.equal(sc.logs.filter((l) => l.msg === 'request' && l['http.response.status_code'] === 429 && l.outcome === 'breakwater').length, 4, 'outcome breakwater in the access log')
})

t.test('rateLimit: the verifier\'s own probe is not limited and takes no user\'s token; a forged probe is', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const sc = await startTestSidecar(t, oneRoute(up.url, { rateLimit: { requestsPerSecond: FROZEN, burst: 1 } }))
  const probe = { 'x-breakwater-synthetic': 'i-probe', 'x-breakwater-probe': sc.sidecar.dataPlane.probeKey }
  t.equal((await send(sc.proxy, '/probe-first', { headers: probe })).status, 200, 'a probe while the bucket is full')
  t.equal((await send(sc.proxy, '/user')).status, 200, 'the user still has the token')
  t.equal((await send(sc.proxy, '/user-again')).status, 429, 'the bucket is empty now')
  t.equal((await send(sc.proxy, '/probe', { headers: probe })).status, 200, 'the probe measures the route, not the limit')
  t.equal((await send(sc.proxy, '/forged', { headers: { 'x-breakwater-synthetic': 'i-probe', 'x-breakwater-probe': 'guessed' } })).status, 429, 'a client that claims to be a probe is limited')
})

t.test('rateLimit: a rate too slow for any token to come back, and a huge burst, still give whole-number headers', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const sc = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    routes: [
      { name: 'never', match: { pathPrefix: '/never' }, upstream: 'app', rateLimit: { requestsPerSecond: 5e-324, burst: 1 } },
      { name: 'slow', match: { pathPrefix: '/slow' }, upstream: 'app', rateLimit: { requestsPerSecond: 1e-30, burst: 1 } },
      { name: 'huge', match: { pathPrefix: '/huge' }, upstream: 'app', rateLimit: { requestsPerSecond: 1e-6, burst: 1e300 } }
    ]
  })
  for (const route of ['never', 'slow']) {
    t.equal((await send(sc.proxy, `/${route}/1`)).status, 200, `${route}: the burst is served`)
    const r = await send(sc.proxy, `/${route}/2`)
    t.equal(r.status, 429)
    // RFC 9111 §1.2.2: delta-seconds past what can be represented are 2^31.
    t.equal(r.headers['retry-after'], '2147483648', `${route}: retry-after in whole seconds`)
    t.equal(r.headers['ratelimit-policy'], `"${route}";q=1;w=2147483648`)
    t.equal(r.headers.ratelimit, `"${route}";r=0;t=2147483648`)
  }
  const huge = (sc.sidecar.dataPlane.runtime.routes.routes[2] as { rateLimiter: RateLimiter }).rateLimiter
  t.equal(huge.policy, '"huge";q=999999999999999;w=2147483648', 'q within a structured-field Integer (RFC 8941: 15 digits)')
})

t.test('rateLimit: the bucket refills at requestsPerSecond', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const sc = await startTestSidecar(t, oneRoute(up.url, { rateLimit: { requestsPerSecond: 2, burst: 1 } }))
  t.equal((await send(sc.proxy, '/a')).status, 200)
  // The second may or may not find a token, depending on the machine's speed; keep taking until one is refused.
  t.ok(await eventually(async () => (await send(sc.proxy, '/b')).status === 429, 10_000, 0), 'an empty bucket refuses')
  t.ok(await eventually(async () => (await send(sc.proxy, '/c')).status === 200, 10_000, 50), 'a token comes back')
})

t.test('rateLimit key client: the peer, or the right-most untrusted x-forwarded-for entry behind trusted proxies', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const sc = await startTestSidecar(t, {
    ...oneRoute(up.url, { rateLimit: { requestsPerSecond: FROZEN, burst: 1, key: 'client' } }),
    listen: { proxy: { host: '127.0.0.1', port: 0, trustedProxies: ['127.0.0.0/8', '10.0.0.0/8', 'fd00::/8'] }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } }
  })
  const xff = async (value: string): Promise<number> => (await send(sc.proxy, '/', { headers: { 'x-forwarded-for': value } })).status
  t.equal(await xff('203.0.113.1'), 200, 'client 203.0.113.1')
  t.equal(await xff('203.0.113.1'), 429, 'the same client again')
  t.equal(await xff('203.0.113.2'), 200, 'another client has its own bucket')
  t.equal(await xff('198.51.100.7, 203.0.113.1'), 429, 'a spoofed entry left of the real client changes nothing')
  t.equal(await xff('203.0.113.1, 198.51.100.8'), 200, 'the right-most untrusted entry is the client')
  t.equal(await xff('203.0.113.3, 10.1.2.3'), 200, 'a trusted proxy in the chain is skipped...')
  t.equal(await xff('203.0.113.3'), 429, '...so its client is 203.0.113.3')
  t.equal(await xff('2001:db8::1'), 200, 'IPv6 client')
  t.equal(await xff('[2001:DB8::1]:4711'), 429, 'the same IPv6 client, bracketed with a port and in upper case')
  t.equal(await xff('::ffff:203.0.113.9'), 200, 'an IPv4-mapped client')
  t.equal(await xff('203.0.113.9:5000'), 429, 'is the same IPv4 client')
  t.equal(await xff('2001:db8::2, fd00::1'), 200, 'IPv6 trusted proxy skipped')
  t.equal(await xff('not-an-address'), 200, 'garbage: keyed by the trusted hop that reported it (the peer)')
  t.equal(await xff('still-garbage'), 429, 'every garbage entry shares that one bucket: a client cannot mint keys')
})

t.test('rateLimit key client without trustedProxies: x-forwarded-for is not believed', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const sc = await startTestSidecar(t, oneRoute(up.url, { rateLimit: { requestsPerSecond: FROZEN, burst: 1, key: 'client' } }))
  t.equal((await send(sc.proxy, '/', { headers: { 'x-forwarded-for': '203.0.113.1' } })).status, 200)
  t.equal((await send(sc.proxy, '/', { headers: { 'x-forwarded-for': '203.0.113.2' } })).status, 429, 'a new spoofed address is still the same peer')
})

t.test('rateLimit key client: trustedProxies, a listener setting, change at a restart and not half-way at a reload', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const input = oneRoute(up.url, { rateLimit: { requestsPerSecond: FROZEN, burst: 1, key: 'client' } })
  const sc = await startTestSidecar(t, input)
  const trusting = {
    ...oneRoute(up.url, { rateLimit: { requestsPerSecond: FROZEN, burst: 2, key: 'client' } }),
    listen: { proxy: { host: '127.0.0.1', port: 0, trustedProxies: ['127.0.0.0/8'] }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } }
  }
  // The route's limit changes too, so its buckets are new: they must still key by the running listener.
  await sc.sidecar.apply(resolveConfig(testSidecarInput(trusting, sc.stateDir)).config)
  t.ok(sc.logs.some((l) => l.event === 'config_reload' && l.msg === 'listener changes take effect at the next restart'), 'the reload says when the listener change applies')
  const xff = async (value: string): Promise<number> => (await send(sc.proxy, '/', { headers: { 'x-forwarded-for': value } })).status
  t.same([await xff('203.0.113.1'), await xff('203.0.113.2'), await xff('203.0.113.3')], [200, 200, 429], 'x-forwarded-for is still not believed: one bucket for the peer, burst 2')
  t.ok(sc.sidecar.dataPlane.setRouteRateLimit('root', { requestsPerSecond: FROZEN, burst: 1 }))
  t.same([await xff('203.0.113.4'), await xff('203.0.113.5')], [200, 429], 'nor by an override made after the reload')
})

t.test('rateLimit key client: a route moved to another listener by a reload keys clients by that listener\'s trustedProxies', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const listen = { proxy: { host: '127.0.0.1', port: 0, trustedProxies: ['127.0.0.0/8'] }, egress: { host: '127.0.0.1', port: 0 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } }
  const on = (listener: string): Record<string, unknown> => ({ ...oneRoute(up.url, { listener, rateLimit: { requestsPerSecond: FROZEN, burst: 1, key: 'client' } }), listen })
  const sc = await startTestSidecar(t, on('proxy'))
  const xff = async (base: string, value: string): Promise<number> => (await send(base, '/', { headers: { 'x-forwarded-for': value } })).status
  t.same([await xff(sc.proxy, '203.0.113.1'), await xff(sc.proxy, '203.0.113.2')], [200, 200], 'behind the proxy listener\'s trusted proxies: one bucket per client')
  await sc.sidecar.apply(resolveConfig(testSidecarInput(on('egress'), sc.stateDir)).config)
  const egress = sc.sidecar.addresses.egress as string
  t.same([await xff(egress, '203.0.113.3'), await xff(egress, '203.0.113.4')], [200, 429], 'the egress listener trusts no proxy: x-forwarded-for is not believed, one bucket for the peer')
})

t.test('rateLimit key header:NAME: one bucket per value; a request without it uses the client key, counted', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const sc = await startTestSidecar(t, oneRoute(up.url, { rateLimit: { requestsPerSecond: FROZEN, burst: 1, key: 'header:X-Api-Key' } }))
  const withKey = async (key?: string): Promise<number> => (await send(sc.proxy, '/', { headers: key === undefined ? {} : { 'x-api-key': key } })).status
  t.equal(await withKey('alpha'), 200)
  t.equal(await withKey('alpha'), 429)
  t.equal(await withKey('beta'), 200, 'another key value, another bucket')
  t.equal(await withKey(), 200, 'no header: the client\'s bucket')
  t.equal(await withKey(), 429, 'no header again: the same client bucket, not unlimited')
  t.equal(await withKey('x'.repeat(300)), 429, 'an oversized value is not a key either: the client bucket')
  const samples = await scrape(sc.ops)
  t.equal(sumOf(samples, 'breakwater_rate_limit_key_fallbacks_total', { route: 'root' }), 3, 'key fallbacks counted')
})

t.test('rateLimit: the key table is bounded at maxKeys, least recently used evicted', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const sc = await startTestSidecar(t, oneRoute(up.url, { rateLimit: { requestsPerSecond: FROZEN, burst: 1, key: 'header:x-user', maxKeys: 3 } }))
  for (let i = 0; i < 20; i++) t.equal((await send(sc.proxy, '/', { headers: { 'x-user': `u${i}` } })).status, 200, `user ${i}: a fresh bucket`)
  const rl = limiter(sc)
  t.equal(rl?.size, 3, 'never more than maxKeys buckets')
  t.equal(rl?.evictions, 17, 'the rest were evicted')
  t.equal((await send(sc.proxy, '/', { headers: { 'x-user': 'u19' } })).status, 429, 'a recent key keeps its bucket')
  t.equal((await send(sc.proxy, '/', { headers: { 'x-user': 'u0' } })).status, 200, 'an evicted key starts full')
})

t.test('setRouteRateLimit: the runtime override applies, survives a reload and clears', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const input = oneRoute(up.url)
  const sc = await startTestSidecar(t, input)
  const dp = sc.sidecar.dataPlane
  t.equal(dp.setRouteRateLimit('nope', { requestsPerSecond: 1, burst: 1 }), false, 'unknown route')
  t.same(await statuses(sc.proxy, 3), [200, 200, 200], 'no limit configured')
  t.ok(dp.setRouteRateLimit('root', { requestsPerSecond: FROZEN, burst: 2 }))
  t.equal((await statuses(sc.proxy, 3)).filter((s) => s === 429).length, 1, 'overridden: burst 2')
  dp.apply(resolveConfig(testSidecarInput(input, sc.stateDir)).config)
  t.equal(await send(sc.proxy, '/').then((r) => r.status), 429, 'kept across a reload, with its buckets')
  t.ok(dp.setRouteRateLimit('root', null))
  t.same(await statuses(sc.proxy, 3), [200, 200, 200], 'cleared: the configured (none) applies again')
})

t.test('rateLimit mitigation lifted while a reload had removed its route: the route comes back without it', async (t) => {
  const up = await startUpstream(echo)
  t.teardown(up.close)
  const both = { upstreams: { app: { url: up.url } }, routes: [{ name: 'search', match: { pathPrefix: '/search' }, upstream: 'app' }, { name: 'root', match: { pathPrefix: '/' }, upstream: 'app' }] }
  const rootOnly = { upstreams: both.upstreams, routes: [both.routes[1]] }
  const sc = await startTestSidecar(t, both)
  const applied = await admin(sc.admin, 'POST', '/v1/mitigations', { action: 'rateLimit', routes: ['search'], requestsPerSecond: FROZEN, burst: 1, reason: 'spike' })
  t.equal(applied.status, 201)
  t.same([(await send(sc.proxy, '/search')).status, (await send(sc.proxy, '/search')).status], [200, 429], 'in force')
  await sc.sidecar.apply(resolveConfig(testSidecarInput(rootOnly, sc.stateDir)).config)
  t.equal((await admin(sc.admin, 'DELETE', `/v1/mitigations/${applied.body.id as string}`, { reason: 'spike over' })).status, 200, 'lifted')
  await sc.sidecar.apply(resolveConfig(testSidecarInput(both, sc.stateDir)).config)
  t.same(await Promise.all([1, 2, 3].map(async () => (await send(sc.proxy, '/search')).status)), [200, 200, 200], 'the lifted limit is not in force again')
})

t.test('validate: a rate of 0 or less, a bad key, a bad trusted proxy', async (t) => {
  const problems = (raw: Record<string, unknown>): string[] => {
    try {
      resolveConfig({ service: 's', ...raw })
    } catch (err) {
      t.type(err, ConfigError)
      return [...(err as ConfigError).problems]
    }
    t.fail('accepted')
    return []
  }
  for (const rps of [0, -5]) {
    const p = problems(oneRoute('http://127.0.0.1:1', { rateLimit: { requestsPerSecond: rps } }))
    t.ok(p.some((l) => l.startsWith('routes[0].rateLimit.requestsPerSecond')), `rate ${rps}: ${p.join('; ')}`)
  }
  const key = problems(oneRoute('http://127.0.0.1:1', { rateLimit: { requestsPerSecond: 1, key: 'cookie' } }))
  t.ok(key.some((l) => l.startsWith('routes[0].rateLimit.key')), key.join('; '))
  const trusted = problems({ ...oneRoute('http://127.0.0.1:1'), listen: { proxy: { trustedProxies: ['10.0.0.0/33', 'proxy.local'] } } })
  t.ok(trusted.some((l) => l.startsWith('listen.proxy.trustedProxies[0]')), trusted.join('; '))
  t.ok(trusted.some((l) => l.startsWith('listen.proxy.trustedProxies[1]')), trusted.join('; '))
})
