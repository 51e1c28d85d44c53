// Micro benchmarks of the per-request cost of the resilience stages, run against the built
// code (dist/). Each case runs in rounds; the report is the median ns per operation, next to a
// baseline that does the same loop without the stage.
//
//   node bench/micro/stages.mjs [--rounds 7] [--ops 2000000]
import { parseArgs } from 'node:util'
import { FlagdCore } from '@openfeature/flagd-core'
import { killSwitchAllows } from '../../dist/proxy/kill-switch.js'
import { TargetedFlag } from '../../dist/flags/targeting.js'
import { Circuit, RotationClock } from '../../dist/proxy/circuit-breaker.js'
import { RouteStats } from '../../dist/proxy/stats.js'
import { RateLimiter } from '../../dist/proxy/rate-limit.js'
import { FallbackCache, DEGRADABLE } from '../../dist/proxy/fallback.js'
import { trustedBlockList } from '../../dist/config/rungs.js'

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '7' }, ops: { type: 'string', default: '2000000' } } })
const rounds = Number(values.rounds)
const ops = Number(values.ops)

function median (xs) {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]
}

async function measure (name, fn, n = ops) {
  const samples = []
  await fn(Math.min(n, 100_000)) // warm up
  for (let r = 0; r < rounds; r++) {
    const t0 = process.hrtime.bigint()
    await fn(n)
    samples.push(Number(process.hrtime.bigint() - t0) / n)
  }
  return { name, nsPerOp: median(samples), min: Math.min(...samples), max: Math.max(...samples) }
}

// --- kill switch: one Map.get on the snapshot, as the pipeline does it ---
const snapshot = { values: new Map([['enableNewCheckout', true], ['other', false]]), targeted: null, enabled (key) { return this.values.get(key) !== false } }
const guarded = { config: { killSwitch: 'enableNewCheckout', match: { strict: false } } }
const unguarded = { config: { killSwitch: null, match: { strict: false } } }
// Request heads with distinct request ids (the default targeting key) and a user header.
const heads = Array.from({ length: 1024 }, (_, i) => ({ headers: ['host', 'shop.example', 'x-user', `user-${i}`], host: 'shop.example', requestId: `req-${i}`, hasBody: false, isWebSocket: false }))
let sink = 0
const results = []
results.push(await measure('baseline loop', (n) => { for (let i = 0; i < n; i++) sink += i & 1 }))
results.push(await measure('kill switch: route without a flag', (n) => { for (let i = 0; i < n; i++) sink += killSwitchAllows(snapshot, unguarded, 'GET', '/checkout/v1/cart', heads[i & 1023]) ? 1 : 0 }))
results.push(await measure('kill switch: flag lookup', (n) => { for (let i = 0; i < n; i++) sink += killSwitchAllows(snapshot, guarded, 'GET', '/checkout/v1/cart', heads[i & 1023]) ? 1 : 0 }))

// --- targeted kill switch: flagd-core evaluates the rule per request (target: <= 2 µs) ---
const quiet = { error () {}, warn () {}, info () {}, debug () {} }
const core = new FlagdCore(undefined, quiet)
core.setConfigurations(JSON.stringify({
  flags: {
    enableNewCheckout: {
      state: 'ENABLED',
      variants: { on: true, off: false },
      defaultVariant: 'on',
      targeting: { if: [{ starts_with: [{ var: 'path' }, '/checkout/v2'] }, 'off', { fractional: [['on', 90], ['off', 10]] }] }
    }
  }
}))
const byRequestId = { ...snapshot, targeted: new Map([['enableNewCheckout', new TargetedFlag('enableNewCheckout', core, true, 'x-request-id', quiet)]]) }
const byUserHeader = { ...snapshot, targeted: new Map([['enableNewCheckout', new TargetedFlag('enableNewCheckout', core, true, 'x-user', quiet)]]) }
results.push(await measure('kill switch: targeted flag, if + fractional on the request id', (n) => { for (let i = 0; i < n; i++) sink += killSwitchAllows(byRequestId, guarded, 'GET', '/checkout/v1/cart', heads[i & 1023]) ? 1 : 0 }))
results.push(await measure('kill switch: targeted flag, if + fractional on a user header', (n) => { for (let i = 0; i < n; i++) sink += killSwitchAllows(byUserHeader, guarded, 'GET', '/checkout/v1/cart', heads[i & 1023]) ? 1 : 0 }))
results.push(await measure('kill switch: untargeted flag while another flag is targeted', (n) => { for (let i = 0; i < n; i++) sink += killSwitchAllows(byRequestId, { config: { killSwitch: 'other', match: { strict: false } } }, 'GET', '/checkout/v1/cart', heads[i & 1023]) ? 1 : 0 }))

// --- circuit breaker stage, closed: admission check + enter + the verdict counted at the end ---
const clock = new RotationClock()
const circuit = new Circuit('bench', { failureThreshold: 0.5, volumeThreshold: 20, rollingWindowMs: 10_000, recoveryTimeout: 30_000, maxConcurrentRequests: 0, failureStatuses: [500, 502, 503, 504] }, clock, { onTransition () {} })
// A request stand-in: starts, and its cause is known at once (as a response head would make it).
const request = { start () {} }
const BATCH = 1000
async function breakerRun (n) {
  for (let i = 0; i < n; i += BATCH) {
    for (let j = 0; j < BATCH; j++) {
      if (!circuit.admits()) continue
      const pass = circuit.enter()
      request.start()
      if (pass !== null) circuit.settle(pass, 'ok')
    }
    await null // let the settled promises run, as the event loop would between requests
  }
}
async function baselineRun (n) {
  for (let i = 0; i < n; i += BATCH) {
    for (let j = 0; j < BATCH; j++) request.start()
    await null
  }
}
const breakerOps = Math.min(ops, 500_000)
results.push(await measure('breaker baseline (request started directly)', baselineRun, breakerOps))
results.push(await measure('breaker stage, closed (admits + enter + settle)', breakerRun, breakerOps))
circuit.shutdown()
clock.stop()

// --- trigger windows: one outcome into the per-second buckets, as forward.ts does per request ---
const stats = new RouteStats('bench', 'bench')
let latency = 0
results.push(await measure('window baseline (Date.now + latency math)', (n) => { for (let i = 0; i < n; i++) { latency = (i & 1023) / 10; sink += Date.now() & 1 } }))
results.push(await measure('window record (Date.now + outcome)', (n) => { for (let i = 0; i < n; i++) { latency = (i & 1023) / 10; stats.outcome(Date.now(), (i & 63) === 0, latency) } }))

// --- rate limit stage: the null check of an unlimited route, then a token per key kind ---
// A huge rate, so every request takes a token (the refusal path only adds a header array).
const unlimited = { rateLimiter: null }
const limit = (key, trusted = null) => new RateLimiter('bench', { requestsPerSecond: 1e9, burst: 1e9, key, maxKeys: 100_000 }, trusted)
const byRoute = limit('route')
const byClient = limit('client')
const behindProxy = limit('client', trustedBlockList(['127.0.0.0/8', '10.0.0.0/8']))
const byHeader = limit('header:x-api-key')
// 1,000 clients and keys, so the key table and its LRU move as they would under traffic.
const peers = Array.from({ length: 1000 }, (_, i) => ({ socket: { remoteAddress: `10.1.${i >> 8}.${i & 255}` }, headers: { 'x-api-key': `key-${i}` } }))
const proxied = Array.from({ length: 1000 }, (_, i) => ({ socket: { remoteAddress: '127.0.0.1' }, headers: { 'x-forwarded-for': `203.0.${i >> 8}.${i & 255}, 10.0.0.7` } }))
const limited = (limiter, reqs) => (n) => { for (let i = 0; i < n; i++) sink += limiter.take(reqs[i % 1000], performance.now()) }
results.push(await measure('rate limit: route without one (null check)', (n) => { for (let i = 0; i < n; i++) sink += unlimited.rateLimiter === null ? 1 : 0 }))
results.push(await measure('rate limit baseline (performance.now)', (n) => { for (let i = 0; i < n; i++) sink += performance.now() & 1 }))
results.push(await measure('rate limit: key route', limited(byRoute, peers)))
results.push(await measure('rate limit: key client (peer address)', limited(byClient, peers)))
results.push(await measure('rate limit: key client behind trusted proxies (x-forwarded-for walk)', limited(behindProxy, proxied)))
results.push(await measure('rate limit: key header:x-api-key', limited(byHeader, peers)))

// --- fallback check: what a refusal costs on a route without one, and a stale lookup on one with one ---
const noFallback = { fallback: null }
results.push(await measure('fallback: route without one (refusal check)', (n) => { for (let i = 0; i < n; i++) sink += noFallback.fallback != null && DEGRADABLE.has('circuit_open') ? 1 : 0 }))
const cache = new FallbackCache({ maxEntries: 1000, maxBytes: 64 * 1024 * 1024, maxEntryBytes: 1024 * 1024 })
const getReq = { method: 'GET', headers: { 'accept-language': 'en' } }
for (let i = 0; i < 1000; i++) {
  const capture = cache.capture(getReq, `host\u0000/item/${i}`, 200, ['content-type', 'application/json', 'vary', 'Accept-Language', 'content-length', '1024'])
  capture.add(Buffer.alloc(1024))
  capture.complete(Date.now())
}
results.push(await measure('fallback: stale lookup (hit, with Vary)', (n) => { for (let i = 0; i < n; i++) sink += cache.lookup(getReq, `host\u0000/item/${i % 1000}`, Date.now(), 60_000) === null ? 0 : 1 }))
results.push(await measure('fallback: capture decision on a storable 200', (n) => { for (let i = 0; i < n; i++) sink += cache.capture(getReq, 'host\u0000/x', 200, ['content-type', 'text/plain', 'cache-control', 'max-age=60', 'content-length', '512']) === null ? 0 : 1 }))

console.log(`node ${process.version}, ${rounds} rounds, median ns per op (min–max)\n`)
console.log('| case | ns/op | min–max |')
console.log('|---|---:|---:|')
for (const r of results) console.log(`| ${r.name} | ${r.nsPerOp.toFixed(1)} | ${r.min.toFixed(1)}–${r.max.toFixed(1)} |`)
if (sink === 42) console.log('')
