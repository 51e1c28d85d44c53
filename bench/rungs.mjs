#!/usr/bin/env node
// The missing rungs under load (SPEC §17), against the built sidecar:
//   rate limit  autocannon offers 5,000 req/s to a route limited to 1,000 req/s: how many
//               answers were let through per second, against the configured rate (±5 % goal);
//   degrade     a route with `fallback.staleIfError`: warm 200 cacheable URLs, stop the upstream,
//               then 30 s of GETs over them: the share answered stale, and the sidecar's RSS
//               against the cache's `maxBytes` (goal: within maxBytes + 10 MB).
// Counts and a memory reading, so a busy machine moves the load, not the verdict much.
//
// Usage: node bench/rungs.mjs [--outage-s 30] [--rate-s 10]
import http from 'node:http'
import { mkdtempSync, rmSync, writeFileSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import autocannon from 'autocannon'
import { Pool } from 'undici'
import { freePort, startProcess, stopProcess, waitReady } from './lib/processes.mjs'

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const { values } = parseArgs({ options: { 'outage-s': { type: 'string', default: '30' }, 'rate-s': { type: 'string', default: '10' } } })
const OUTAGE_S = Number(values['outage-s'])
const RATE_S = Number(values['rate-s'])
const RPS = 1000
const OFFERED = 5000
const MAX_BYTES = 8 * 1024 * 1024

function rssMiB (pid) {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  return m === null ? NaN : Number(m[1]) / 1024
}

async function upstream () {
  const body = Buffer.alloc(16 * 1024, 97) // 16 KiB per page: 200 pages = 3.2 MB cached
  const server = http.createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'max-age=60', 'content-length': String(body.length) })
    res.end(body)
  })
  const port = await freePort()
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve))
  return { port, close: () => new Promise((resolve) => { server.closeAllConnections(); server.close(resolve) }) }
}

const tmp = mkdtempSync(join(tmpdir(), 'breakwater-rungs-'))
const up = await upstream()
const [port, ops, admin] = [await freePort(), await freePort(), await freePort()]
const conf = join(tmp, 'breakwater.yaml')
writeFileSync(conf, [
  'service: bench', 'version: bench', `stateDir: ${join(tmp, 'state')}`,
  'listen:', `  proxy: { host: 127.0.0.1, port: ${port} }`, `  ops: { host: 127.0.0.1, port: ${ops} }`, `  admin: { host: 127.0.0.1, port: ${admin} }`,
  'upstreams:', `  app: { url: http://127.0.0.1:${up.port} }`,
  'routes:',
  '  - name: limited',
  '    match: { pathPrefix: /limited }',
  '    upstream: app',
  `    rateLimit: { requestsPerSecond: ${RPS}, burst: 100, key: route }`,
  '  - name: pages',
  '    match: { pathPrefix: /pages }',
  '    upstream: app',
  `    fallback: { staleIfError: 10m, cache: { maxEntries: 1000, maxBytes: ${MAX_BYTES} } }`,
  'logging: { accessLog: false }'
].join('\n') + '\n')
const proc = startProcess({ name: 'breakwater', cmd: process.execPath, args: [join(repoRoot, 'dist', 'cli.js'), 'start', '--config', conf], stdout: join(tmp, 'out.log'), stderr: join(tmp, 'err.log') })
let upClosed = false
try {
  await waitReady(proc, [`http://127.0.0.1:${ops}/live`], 15_000)

  // ---- rate limit
  const rate = await autocannon({ url: `http://127.0.0.1:${port}/limited`, connections: 50, overallRate: OFFERED, duration: RATE_S })
  const allowed = rate['2xx']
  const refused = rate.non2xx
  const allowedPerS = allowed / RATE_S
  const expected = RPS + 100 / RATE_S // the burst once, spread over the run
  console.log(`rate limit: offered ${OFFERED} req/s for ${RATE_S} s (${rate.requests.total} sent); let through ${allowed} (${allowedPerS.toFixed(1)} req/s), refused ${refused} with 429`)
  console.log(`  statuses: ${JSON.stringify(Object.fromEntries(Object.entries(rate.statusCodeStats ?? {}).map(([k, v]) => [k, v.count])))}`)
  console.log(`  configured ${RPS} req/s + burst 100: expected ${expected.toFixed(1)} req/s; deviation ${(100 * (allowedPerS - expected) / expected).toFixed(2)} % (goal within ±5 %)`)

  // ---- degrade
  const pool = new Pool(`http://127.0.0.1:${port}`, { connections: 32 })
  const get = async (path) => {
    const res = await pool.request({ path, method: 'GET' })
    await res.body.dump()
    return { status: res.statusCode, stale: res.headers['x-breakwater-fallback'] === 'stale' }
  }
  for (let i = 0; i < 200; i++) await get(`/pages/${i}`)
  const rssWarm = rssMiB(proc.pid)
  await up.close()
  upClosed = true
  let total = 0
  let stale = 0
  let other = 0
  let peak = rssWarm
  const until = Date.now() + OUTAGE_S * 1000
  while (Date.now() < until) {
    const batch = await Promise.all(Array.from({ length: 32 }, (_, j) => get(`/pages/${(total + j) % 200}`).catch(() => ({ status: 0, stale: false }))))
    for (const r of batch) { total++; if (r.status === 200 && r.stale) stale++; else other++ }
    if (total % 3200 < 32) peak = Math.max(peak, rssMiB(proc.pid))
  }
  await pool.close()
  peak = Math.max(peak, rssMiB(proc.pid))
  console.log(`degrade: ${OUTAGE_S} s upstream outage, ${total} GETs over 200 cached pages: ${stale} stale (${(100 * stale / total).toFixed(2)} %), ${other} not`)
  console.log(`  RSS ${rssWarm.toFixed(1)} MiB warm, ${peak.toFixed(1)} MiB peak during the outage; cache maxBytes ${(MAX_BYTES / 1048576).toFixed(0)} MiB`)
} finally {
  await stopProcess(proc)
  if (!upClosed) await up.close()
  rmSync(tmp, { recursive: true, force: true })
}
