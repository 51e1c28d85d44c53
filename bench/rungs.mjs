#!/usr/bin/env node
// The missing rungs under load (SPEC §17), against the built sidecar:
//   rate limit  autocannon offers 5,000 req/s to a route limited to 1,000 req/s; the upstream
//               timestamps every request it is let through, so the accepted rate is read per
//               second, steady state (after the first second's initial burst) and over the
//               whole run, against the configured rate (±5 % goal). Two load shapes:
//               - one autocannon (`overallRate`), which sends each connection's share at the
//                 start of every second: a 1 s period, so the route has `burst` = one second
//                 of its rate (the default), or the bucket overflows between the bursts;
//               - ten autocannons of 500 req/s each, started 100 ms apart: ten bursts a second,
//                 against a route with `burst: 100` (a tenth of a second of its rate).
//   degrade     two sidecars side by side, the same config but for one route's cache: `big`
//               has a 32 MiB fallback cache on /bulk, `none` no fallback there. Both are sent
//               the same 40 MiB of 256 KiB cacheable bodies on /bulk (so `big`'s cache is full
//               and has evicted), and both warm 200 small pages on /pages. Then the upstream
//               stops and both take the same closed-loop GETs over /pages for the outage: the
//               share answered stale, and the RSS of each (median of samples during the
//               outage); the difference is what a full cache costs (goal: within
//               maxBytes + 10 MB). Afterwards `big` is asked for every /bulk URL: the ones it
//               still answers stale, by their body size, must fit in maxBytes.
// Counts and memory readings, so a busy machine moves the load, not the verdict much.
//
// Each sidecar's memory is also broken down during the outage (1 s samples, medians): smaps
// summed by kind (malloc's [heap], anonymous maps, files), V8's heap and external memory.
//
// Usage: node bench/rungs.mjs [--outage-s 30] [--rate-s 10] [--only rate|degrade]
//          [--node-args '--max-semi-space-size=8'] [--env MALLOC_ARENA_MAX=2,...]
import http from 'node:http'
import { mkdtempSync, rmSync, writeFileSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import autocannon from 'autocannon'
import { Pool } from 'undici'
import { freePort, sleep, startProcess, stopProcess, waitReady } from './lib/processes.mjs'

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const { values } = parseArgs({
  options: {
    'outage-s': { type: 'string', default: '30' },
    'rate-s': { type: 'string', default: '10' },
    only: { type: 'string' },
    'node-args': { type: 'string', default: '' },
    env: { type: 'string', default: '' }
  }
})
const OUTAGE_S = Number(values['outage-s'])
const RATE_S = Number(values['rate-s'])
const ONLY = values.only ?? null
// Node options and environment for the sidecars (both alike), e.g. --node-args '--max-semi-space-size=1' --env MALLOC_ARENA_MAX=2
const NODE_ARGS = values['node-args'].split(' ').filter((a) => a !== '')
const SIDECAR_ENV = { ...process.env, ...Object.fromEntries(values.env.split(',').filter((e) => e !== '').map((e) => [e.slice(0, e.indexOf('=')), e.slice(e.indexOf('=') + 1)])) }
if (ONLY !== null && ONLY !== 'rate' && ONLY !== 'degrade') throw new Error(`--only: rate or degrade, not ${ONLY}`)
const RPS = 1000
const OFFERED = 5000
const PAGES = 200
const PAGE_BYTES = 16 * 1024
const CACHE_BYTES = 32 * 1024 * 1024
const BULK = 160
const BULK_BYTES = 256 * 1024
const MiB = 1024 * 1024

/**
 * Where a process's resident memory is: /proc/PID/smaps summed by mapping kind (malloc's
 * `[heap]`, anonymous mmaps, file-backed and the rest) and the V8 figures its ops port serves
 * on /metrics (prom-client's default metrics), in MiB.
 */
async function breakdown (pid, opsPort) {
  const out = { heap: 0, anon: 0, file: 0, other: 0 }
  let kind = 'other'
  for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
    const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line)
    if (head !== null) {
      const path = head[1]
      kind = path === '[heap]' ? 'heap' : path === '' ? 'anon' : path.startsWith('/') ? 'file' : 'other'
      continue
    }
    const m = /^Rss:\s+(\d+) kB/.exec(line)
    if (m !== null) out[kind] += Number(m[1]) / 1024
  }
  const text = await fetch(`http://127.0.0.1:${opsPort}/metrics`).then((r) => r.text()).catch(() => '')
  const metric = (name) => { const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text); return m === null ? NaN : Number(m[1]) / MiB }
  out.v8Total = metric('nodejs_heap_size_total_bytes')
  out.v8Used = metric('nodejs_heap_size_used_bytes')
  out.v8New = metric('nodejs_heap_space_size_total_bytes\\{space="new"\\}')
  out.v8Old = metric('nodejs_heap_space_size_total_bytes\\{space="old"\\}')
  out.v8Large = metric('nodejs_heap_space_size_total_bytes\\{space="large_object"\\}')
  out.external = metric('nodejs_external_memory_bytes')
  out.rss = out.heap + out.anon + out.file + out.other
  out.outsideV8 = out.rss - out.v8Total
  return out
}
const BREAKDOWN = ['rss', 'outsideV8', 'heap', 'anon', 'file', 'other', 'v8Total', 'v8Used', 'v8New', 'v8Old', 'v8Large', 'external']
const showBreakdown = (b) => BREAKDOWN.map((k) => `${k} ${b[k].toFixed(1)}`).join(', ')
const medianBreakdown = (list) => Object.fromEntries(BREAKDOWN.map((k) => [k, median(list.map((b) => b[k]))]))

function rssMiB (pid) {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  return m === null ? NaN : Number(m[1]) / 1024
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length === 0 ? NaN : s.length % 2 === 1 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}
const pct = (x, of) => `${x >= of ? '+' : ''}${(100 * (x - of) / of).toFixed(2)} %`

/** The upstream: pages, bulk bodies, and the rate-limited path, whose arrivals it timestamps. */
async function upstream () {
  const page = Buffer.alloc(PAGE_BYTES, 97)
  const bulk = Buffer.alloc(BULK_BYTES, 98)
  const arrivals = new Map() // route path → performance.now() of each request let through
  const server = http.createServer((req, res) => {
    const url = req.url ?? '/'
    if (url.startsWith('/limited')) {
      let list = arrivals.get(url)
      if (list === undefined) arrivals.set(url, list = [])
      list.push(performance.now())
      res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '2' })
      res.end('ok')
      return
    }
    const body = url.startsWith('/bulk') ? bulk : page
    res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'max-age=60', 'content-length': String(body.length) })
    res.end(body)
  })
  const port = await freePort()
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve))
  let closed = false
  return {
    port,
    arrivals,
    close: () => {
      if (closed) return Promise.resolve()
      closed = true
      return new Promise((resolve) => { server.closeAllConnections(); server.close(resolve) })
    }
  }
}

/** Start a sidecar with `routes` (YAML lines); resolves once it is live. */
async function sidecar (tmp, name, upPort, routes) {
  const dir = join(tmp, name)
  const [port, ops, admin] = [await freePort(), await freePort(), await freePort()]
  const conf = `${dir}.yaml`
  writeFileSync(conf, [
    'service: bench', 'version: bench', `stateDir: ${dir}`,
    'listen:', `  proxy: { host: 127.0.0.1, port: ${port} }`, `  ops: { host: 127.0.0.1, port: ${ops} }`, `  admin: { host: 127.0.0.1, port: ${admin} }`,
    'upstreams:', `  app: { url: http://127.0.0.1:${upPort} }`,
    'routes:', ...routes,
    'logging: { accessLog: false }'
  ].join('\n') + '\n')
  const proc = startProcess({ name, cmd: process.execPath, args: [...NODE_ARGS, join(repoRoot, 'dist', 'cli.js'), 'start', '--config', conf], env: SIDECAR_ENV, stdout: `${dir}.out.log`, stderr: `${dir}.err.log` })
  procs.push(proc)
  await waitReady(proc, [`http://127.0.0.1:${ops}/live`], 15_000)
  return { proc, port, ops }
}

/**
 * Accepted requests per second from the upstream's arrival times, in 1 s bins from `start`
 * (taken just before the load starts, on the clock the upstream stamps with: a load that bursts
 * at each second's start lands at the beginning of a bin, as timers fire late, never early).
 * Bin 0 holds the initial burst; arrivals after the last second (answers in flight when the
 * load stopped) are counted apart.
 */
function perSecond (times, start, seconds) {
  const bins = new Array(seconds).fill(0)
  let late = 0
  for (const t of times) {
    const k = Math.floor((t - start) / 1000)
    if (k < seconds) bins[k]++
    else late++
  }
  return { bins, late }
}

function reportRate (label, burst, times, start, result) {
  const { bins, late } = perSecond(times, start, RATE_S)
  const steady = bins.slice(1).reduce((a, b) => a + b, 0) / (RATE_S - 1)
  const whole = times.length / RATE_S
  const withBurst = RPS + burst / RATE_S
  console.log(`rate limit, ${label}: offered ${(result.requests.total / RATE_S).toFixed(0)} req/s for ${RATE_S} s (${result.requests.total} sent, ${result.errors} errors); route ${RPS} req/s, burst ${burst}`)
  console.log(`  answers: ${result['2xx']} 2xx, ${result.non2xx} non-2xx ${JSON.stringify(Object.fromEntries(Object.entries(result.statusCodeStats ?? {}).map(([k, v]) => [k, v.count])))}; upstream saw ${times.length}`)
  console.log(`  accepted per second at the upstream: ${bins.join(', ')}${late > 0 ? ` (+${late} after the last second)` : ''}`)
  console.log(`  steady state (seconds 2–${RATE_S}): ${steady.toFixed(1)} req/s, ${pct(steady, RPS)} of ${RPS} (goal ±5 %)`)
  console.log(`  whole run (all ${times.length}): ${whole.toFixed(1)} req/s, ${pct(whole, RPS)} of ${RPS}; ${pct(whole, withBurst)} of ${RPS} + burst/${RATE_S} s = ${withBurst.toFixed(1)}`)
}

async function ratePhase (tmp, up) {
  const { proc, port } = await sidecar(tmp, 'rate', up.port, [
    '  - name: limited',
    '    match: { pathPrefix: /limited/second }',
    '    upstream: app',
    `    rateLimit: { requestsPerSecond: ${RPS}, burst: ${RPS}, key: route }`,
    '  - name: limited-tenths',
    '    match: { pathPrefix: /limited/tenth }',
    '    upstream: app',
    `    rateLimit: { requestsPerSecond: ${RPS}, burst: ${RPS / 10}, key: route }`,
    '  - name: warm',
    '    match: { pathPrefix: /limited/warm }',
    '    upstream: app'
  ])
  try {
    // Enough connections that each sends its share (20 a second) well within the second, even
    // while the machine is busy: a closed loop per connection caps what it can offer.
    // A fresh process is slow for a second or two (compiling): warm it on a route without a limit.
    await autocannon({ url: `http://127.0.0.1:${port}/limited/warm`, connections: 250, overallRate: OFFERED, duration: 2 })
    let start = performance.now()
    const one = await autocannon({ url: `http://127.0.0.1:${port}/limited/second`, connections: 250, overallRate: OFFERED, duration: RATE_S })
    reportRate('one autocannon, 250 connections (bursts once a second)', RPS, up.arrivals.get('/limited/second') ?? [], start, one)
    await sleep(1500) // the bucket refills
    // Each starts 100 ms after the one before and stops with the first: all end at start + RATE_S.
    const runs = []
    start = performance.now()
    for (let i = 0; i < 10; i++) {
      runs.push(autocannon({ url: `http://127.0.0.1:${port}/limited/tenth`, connections: 25, overallRate: OFFERED / 10, duration: RATE_S - (performance.now() - start) / 1000 }))
      await sleep(start + 100 * (i + 1) - performance.now())
    }
    const results = await Promise.all(runs)
    const sum = (f) => results.reduce((a, r) => a + f(r), 0)
    const statusCodeStats = {}
    for (const r of results) {
      for (const [k, v] of Object.entries(r.statusCodeStats ?? {})) statusCodeStats[k] = { count: (statusCodeStats[k]?.count ?? 0) + v.count }
    }
    const merged = { requests: { total: sum((r) => r.requests.total) }, errors: sum((r) => r.errors), '2xx': sum((r) => r['2xx']), non2xx: sum((r) => r.non2xx), statusCodeStats }
    reportRate('ten autocannons 100 ms apart, 25 connections each (ten bursts a second)', RPS / 10, up.arrivals.get('/limited/tenth') ?? [], start, merged)
  } finally {
    await stopProcess(proc)
  }
}

async function degradePhase (tmp, up) {
  const pages = ['  - name: pages', '    match: { pathPrefix: /pages }', '    upstream: app', '    fallback: { staleIfError: 10m, cache: { maxEntries: 1000, maxBytes: 8388608 } }']
  const bulkRoute = ['  - name: bulk', '    match: { pathPrefix: /bulk }', '    upstream: app']
  const sides = {
    big: await sidecar(tmp, 'big', up.port, [...pages, ...bulkRoute, `    fallback: { staleIfError: 10m, cache: { maxEntries: 1000, maxBytes: ${CACHE_BYTES} } }`]),
    none: await sidecar(tmp, 'none', up.port, [...pages, ...bulkRoute])
  }
  const names = Object.keys(sides)
  const pools = {}
  for (const name of names) pools[name] = new Pool(`http://127.0.0.1:${sides[name].port}`, { connections: 32 })
  const get = async (name, path) => {
    const res = await pools[name].request({ path, method: 'GET' })
    let bytes = 0
    for await (const chunk of res.body) bytes += chunk.length
    return { status: res.statusCode, stale: res.headers['x-breakwater-fallback'] === 'stale', bytes }
  }
  const rss = () => Object.fromEntries(names.map((n) => [n, rssMiB(sides[n].proc.pid)]))
  try {
    const idle = rss()
    // The same fill on both: 200 pages, then 40 MiB of bulk bodies, 8 at a time.
    for (const name of names) {
      for (let i = 0; i < PAGES; i++) await get(name, `/pages/${i}`)
      for (let i = 0; i < BULK; i += 8) await Promise.all(Array.from({ length: 8 }, (_, j) => get(name, `/bulk/${i + j}`)))
    }
    await sleep(1000)
    const warm = rss()
    await up.close()

    const samples = Object.fromEntries(names.map((n) => [n, []]))
    const warmParts = Object.fromEntries(await Promise.all(names.map(async (n) => [n, await breakdown(sides[n].proc.pid, sides[n].ops)])))
    const parts = Object.fromEntries(names.map((n) => [n, []]))
    const sampler = setInterval(() => { const r = rss(); for (const n of names) samples[n].push(r[n]) }, 250)
    const partSampler = setInterval(() => { for (const n of names) breakdown(sides[n].proc.pid, sides[n].ops).then((b) => parts[n].push(b)) }, 1000)
    const counts = Object.fromEntries(names.map((n) => [n, { total: 0, stale: 0, other: 0 }]))
    const until = Date.now() + OUTAGE_S * 1000
    const load = async (name) => {
      const c = counts[name]
      while (Date.now() < until) {
        const batch = await Promise.all(Array.from({ length: 32 }, (_, j) => get(name, `/pages/${(c.total + j) % PAGES}`).catch(() => ({ status: 0, stale: false }))))
        for (const r of batch) { c.total++; if (r.status === 200 && r.stale) c.stale++; else c.other++ }
      }
    }
    await Promise.all(names.map(load))
    clearInterval(sampler)
    clearInterval(partSampler)

    // What `big` still holds of /bulk: the URLs it answers stale, by their body size.
    const held = {}
    for (const name of names) {
      held[name] = { stale: 0, bytes: 0, other: 0 }
      for (let i = 0; i < BULK; i++) {
        const r = await get(name, `/bulk/${i}`).catch(() => ({ status: 0, stale: false, bytes: 0 }))
        if (r.status === 200 && r.stale) { held[name].stale++; held[name].bytes += r.bytes } else held[name].other++
      }
    }
    const after = rss()

    console.log(`degrade: ${OUTAGE_S} s upstream outage, the same closed-loop GETs (32 at a time) over ${PAGES} cached ${PAGE_BYTES / 1024} KiB pages on two sidecars at once`)
    for (const n of names) {
      const c = counts[n]
      console.log(`  ${n}: ${c.total} GETs (${(c.total / OUTAGE_S).toFixed(0)}/s), ${c.stale} stale (${(100 * c.stale / c.total).toFixed(2)} %), ${c.other} not`)
    }
    console.log(`  /bulk: ${BULK} × ${BULK_BYTES / 1024} KiB bodies sent through each before the outage; big's cache maxBytes ${CACHE_BYTES / MiB} MiB, none has no cache there`)
    for (const n of names) {
      const s = samples[n]
      console.log(`  RSS ${n}: idle ${idle[n].toFixed(1)} MiB, warm ${warm[n].toFixed(1)} MiB, during the outage median ${median(s).toFixed(1)} MiB (min ${Math.min(...s).toFixed(1)}, max ${Math.max(...s).toFixed(1)}, ${s.length} samples), after ${after[n].toFixed(1)} MiB`)
    }
    const diff = median(samples.big) - median(samples.none)
    const bound = CACHE_BYTES / MiB + 10 / 1.048576
    console.log(`  big − none, medians during the outage: ${diff.toFixed(1)} MiB; bound maxBytes + 10 MB = ${bound.toFixed(1)} MiB: ${diff <= bound ? 'within' : 'OVER'} (${(bound - diff).toFixed(1)} MiB to spare)`)
    console.log(`  warm: big − none ${(warm.big - warm.none).toFixed(1)} MiB`)
    for (const n of names) console.log(`  ${n} MiB warm: ${showBreakdown(warmParts[n])}`)
    const outage = Object.fromEntries(names.map((n) => [n, medianBreakdown(parts[n])]))
    for (const n of names) console.log(`  ${n} MiB outage medians (${parts[n].length} samples): ${showBreakdown(outage[n])}`)
    console.log(`  big − none, outage medians: ${BREAKDOWN.map((k) => `${k} ${(outage.big[k] - outage.none[k]).toFixed(1)}`).join(', ')}`)
    for (const n of names) console.log(`  ${n} answers /bulk stale after the outage: ${held[n].stale} of ${BULK} (${(held[n].bytes / MiB).toFixed(2)} MiB of bodies; ${held[n].other} not)`)
    console.log(`  big's held bodies ${held.big.bytes} bytes ≤ maxBytes ${CACHE_BYTES}: ${held.big.bytes <= CACHE_BYTES ? 'yes' : 'NO'}`)
  } finally {
    await Promise.all(names.map((n) => pools[n].close()))
    for (const n of names) await stopProcess(sides[n].proc)
  }
}

const procs = []
const tmp = mkdtempSync(join(tmpdir(), 'breakwater-rungs-'))
const up = await upstream()
try {
  if (ONLY !== 'degrade') await ratePhase(tmp, up)
  if (ONLY !== 'rate') await degradePhase(tmp, up)
} finally {
  for (const p of procs) await stopProcess(p)
  await up.close()
  rmSync(tmp, { recursive: true, force: true })
}
