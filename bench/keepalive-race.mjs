#!/usr/bin/env node
// The upstream keep-alive race (SPEC §14), measured as a failure rate, side by side:
// an upstream that closes each connection 0–6 ms after answering — half the time saying
// `Connection: close`, half the time not — and the same load of GETs and small POSTs sent
// through Breakwater and through @fastify/http-proxy (retries off, as in the macro bench).
// It counts answers that were not the upstream's 200, POSTs the upstream ran more than once,
// and the retries Breakwater made to get there (`breakwater_retries_total` from its /metrics
// after the run, per request sent). A count, not a timing: a busy machine changes how often the race is hit, not the
// verdict.
//
// Usage: node bench/keepalive-race.mjs [--requests N] [--concurrency C]
import http from 'node:http'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { Pool } from 'undici'
import { freePort, startProcess, stopProcess, waitReady } from './lib/processes.mjs'

const benchDir = dirname(fileURLToPath(import.meta.url))
const repoRoot = resolve(benchDir, '..')
const { values } = parseArgs({ options: { requests: { type: 'string', default: '4000' }, concurrency: { type: 'string', default: '32' } } })
const REQUESTS = Number(values.requests)
const CONCURRENCY = Number(values.concurrency)

/** The closing upstream: counts how often it ran each POST (by its id). */
async function closingUpstream () {
  const ran = new Map()
  let flip = 0
  const server = http.createServer((req, res) => {
    const chunks = []
    req.on('data', (c) => chunks.push(c))
    req.on('end', () => {
      if (req.method === 'POST') {
        const id = Buffer.concat(chunks).toString()
        ran.set(id, (ran.get(id) ?? 0) + 1)
      }
      const announce = (flip++ & 1) === 0
      res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '2', ...(announce ? { connection: 'close' } : {}) })
      res.end('ok', () => setTimeout(() => req.socket.destroy(), Math.random() * 6))
    })
  })
  server.keepAliveTimeout = 60_000
  const port = await freePort()
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve))
  return { port, ran, close: () => new Promise((resolve) => { server.closeAllConnections(); server.close(resolve) }) }
}

async function drive (url) {
  const pool = new Pool(url, { connections: CONCURRENCY, pipelining: 1 })
  let next = 0
  const failures = new Map()
  const worker = async () => {
    while (next < REQUESTS) {
      const i = next++
      const post = i % 2 === 1
      try {
        const res = await pool.request({ path: `/r/${i}`, method: post ? 'POST' : 'GET', body: post ? `post-${i}` : undefined })
        await res.body.dump()
        if (res.statusCode !== 200) failures.set(`${post ? 'POST' : 'GET'} ${res.statusCode}`, (failures.get(`${post ? 'POST' : 'GET'} ${res.statusCode}`) ?? 0) + 1)
      } catch (err) {
        const key = `${post ? 'POST' : 'GET'} ${err.code ?? err.message}`
        failures.set(key, (failures.get(key) ?? 0) + 1)
      }
    }
  }
  await Promise.all(Array.from({ length: CONCURRENCY }, worker))
  await pool.close()
  return failures
}

async function breakwater (dir, upstreamPort) {
  const [port, ops, admin] = [await freePort(), await freePort(), await freePort()]
  const conf = join(dir, 'breakwater.yaml')
  writeFileSync(conf, [
    'service: bench', 'version: bench', `stateDir: ${join(dir, 'state')}`,
    'listen:', `  proxy: { host: 127.0.0.1, port: ${port} }`, `  ops: { host: 127.0.0.1, port: ${ops} }`, `  admin: { host: 127.0.0.1, port: ${admin} }`,
    'upstreams:', `  app: { url: http://127.0.0.1:${upstreamPort} }`,
    'routes:', '  - match: { pathPrefix: / }', '    upstream: app',
    'logging: { accessLog: false }'
  ].join('\n') + '\n')
  const proc = startProcess({ name: 'breakwater', cmd: process.execPath, args: [join(repoRoot, 'dist', 'cli.js'), 'start', '--config', conf], stdout: join(dir, 'bw.log'), stderr: join(dir, 'bw.err') })
  await waitReady(proc, [`http://127.0.0.1:${ops}/live`], 15_000)
  return { url: `http://127.0.0.1:${port}`, proc, metrics: `http://127.0.0.1:${ops}/metrics` }
}

/** The sum of a counter over its labels, read from a Prometheus text exposition. */
async function counter (url, name) {
  const text = await (await fetch(url)).text()
  const samples = text.split('\n').filter((line) => line.startsWith(`${name}{`) || line.startsWith(`${name} `))
  if (samples.length === 0) throw new Error(`${name} is not in ${url}`)
  return samples.reduce((sum, line) => sum + Number(line.slice(line.lastIndexOf(' ') + 1)), 0)
}

async function fastifyProxy (dir, upstreamPort) {
  const port = await freePort()
  const proc = startProcess({ name: 'fastify', cmd: process.execPath, args: [join(benchDir, 'proxies', 'fastify-http-proxy.mjs'), String(port), `http://127.0.0.1:${upstreamPort}`], stdout: join(dir, 'fp.log'), stderr: join(dir, 'fp.err') })
  await waitReady(proc, [`http://127.0.0.1:${port}/`], 15_000)
  return { url: `http://127.0.0.1:${port}`, proc, metrics: null }
}

const rows = []
const tmp = mkdtempSync(join(tmpdir(), 'breakwater-race-'))
try {
  for (const [name, start] of [['breakwater', breakwater], ['@fastify/http-proxy', fastifyProxy]]) {
    const up = await closingUpstream()
    const target = await start(tmp, up.port)
    try {
      const failures = await drive(target.url)
      const failed = [...failures.values()].reduce((a, b) => a + b, 0)
      const twice = [...up.ran.values()].filter((n) => n > 1).length
      const retries = target.metrics === null ? null : await counter(target.metrics, 'breakwater_retries_total')
      rows.push({ name, failed, twice, retries, detail: [...failures].map(([k, v]) => `${k}: ${v}`).join(', ') || '—' })
    } finally {
      await stopProcess(target.proc)
      await up.close()
    }
  }
} finally {
  rmSync(tmp, { recursive: true, force: true })
}

console.log(`keep-alive race: ${REQUESTS} requests (GET and POST alternating), concurrency ${CONCURRENCY}; the upstream closes every connection 0–6 ms after answering`)
console.log('| proxy | failed | failure rate | retries | retry rate | POSTs run twice | failures |')
console.log('|---|---|---|---|---|---|---|')
const percent = (n) => `${(100 * n / REQUESTS).toFixed(2)} %`
for (const r of rows) console.log(`| ${r.name} | ${r.failed} | ${percent(r.failed)} | ${r.retries ?? '—'} | ${r.retries === null ? '— (none made)' : percent(r.retries)} | ${r.twice} | ${r.detail} |`)
