// Start-up benchmark: how long a fresh `breakwater` process takes to be useful.
//
//   node bench/startup.mjs [--runs N] [--root DIR] [--label TEXT] [--json FILE]
//
// --root: the checkout whose dist/cli.js is measured (default: this one), e.g. an older commit
// built in a temp folder, to compare in the same minutes on the same machine. --label names it in
// the report (default: the checkout's git commit).
//
// Measured, each over N fresh processes (median, min, max):
//   - start → /live: from spawning `node dist/cli.js start --config X` to the first 200 from
//     the ops port's GET /live, for a plain config (one upstream, one route) and a full one
//     (every feature that needs no outside server: flags from a flag file, kill switches,
//     breakers, triggers, retries, fallback, rate limits, fault injection, health checks,
//     failover, notifications, verification, a webhook rollback, an egress listener, tracing);
//   - `breakwater kill`: from spawning `node dist/cli.js kill FLAG --reason … --config X` to its
//     exit, against a sidecar that runs, with the admin address and token read from the config.
// Next to each wall-clock time, the CPU time (user + system) the measured process had used by
// then: on a busy machine the wall clock waits for a core, the CPU time much less so.
// The report (a markdown table) goes to stdout, progress to stderr.
import { execFileSync, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { request } from 'node:http'
import { cpus, loadavg, tmpdir, totalmem } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { freePort } from './lib/processes.mjs'
import { median } from './lib/stats.mjs'

const { values } = parseArgs({ options: { runs: { type: 'string', default: '11' }, root: { type: 'string' }, label: { type: 'string' }, json: { type: 'string' } } })
const repoRoot = resolve(values.root ?? join(dirname(fileURLToPath(import.meta.url)), '..'))
const cli = join(repoRoot, 'dist', 'cli.js')
const label = values.label ?? (() => {
  try { return `git ${execFileSync('git', ['-C', repoRoot, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim()}` } catch { return 'this checkout' }
})()
const runs = Number(values.runs)
if (!Number.isInteger(runs) || runs < 1) throw new Error('--runs N: a whole number of at least 1')

const log = (text) => process.stderr.write(`${text}\n`)
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const now = () => performance.now()

const tmp = mkdtempSync(join(tmpdir(), 'breakwater-startup-'))
const children = new Set()
process.on('exit', () => {
  for (const child of children) { try { child.kill('SIGKILL') } catch {} }
  rmSync(tmp, { recursive: true, force: true })
})

/** Clock ticks per second of /proc/PID/stat's utime and stime. */
const CLK_TCK = (() => { try { return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100 } catch { return 100 } })()

/** CPU milliseconds (user + system) a running process has used, from /proc; null without /proc. */
function cpuMs (pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return (Number(fields[11]) + Number(fields[12])) * 1000 / CLK_TCK
  } catch {
    return null
  }
}

/** Preloaded into each CLI run: at exit, append the process's own CPU time to $BENCH_CPU_FILE. */
const CPU_PRELOAD = join(tmp, 'cpu-at-exit.cjs')
writeFileSync(CPU_PRELOAD, "process.on('exit', () => { const u = process.cpuUsage(); require('node:fs').appendFileSync(process.env.BENCH_CPU_FILE, ((u.user + u.system) / 1000) + '\\n') })\n")

/** One GET on a fresh connection: the status, or null when nothing answers. */
function status (url) {
  return new Promise((resolve) => {
    const req = request(url, { agent: false, timeout: 1000 }, (res) => {
      res.resume()
      res.on('end', () => resolve(res.statusCode ?? null))
    })
    req.on('timeout', () => req.destroy())
    req.on('error', () => resolve(null))
    req.end()
  })
}

function startSidecar (config) {
  const child = spawn(process.execPath, [cli, 'start', '--config', config], { stdio: ['ignore', 'ignore', 'pipe'], cwd: repoRoot })
  let stderr = ''
  child.stderr.on('data', (chunk) => { stderr += chunk })
  children.add(child)
  child.on('exit', () => children.delete(child))
  return { child, stderr: () => stderr }
}

async function stop (child) {
  if (child.exitCode !== null || child.signalCode !== null) return
  const exited = new Promise((resolve) => child.once('exit', resolve))
  child.kill('SIGKILL')
  await exited
}

/** Spawn a sidecar and poll /live every 2 ms: milliseconds from spawn to the first 200, and its CPU time then. */
async function timeToLive (config, opsPort) {
  const started = now()
  const sidecar = startSidecar(config)
  const url = `http://127.0.0.1:${opsPort}/live`
  for (;;) {
    if (sidecar.child.exitCode !== null) throw new Error(`the sidecar exited (${sidecar.child.exitCode}): ${sidecar.stderr()}`)
    if (await status(url) === 200) break
    if (now() - started > 30_000) throw new Error(`no 200 from ${url} in 30 s: ${sidecar.stderr()}`)
    await sleep(2)
  }
  const ms = now() - started
  const cpu = cpuMs(sidecar.child.pid)
  await stop(sidecar.child)
  return { ms, cpu }
}

/** Run the CLI to its exit: milliseconds, its CPU time and the exit code. */
function runCli (args) {
  const cpuFile = join(tmp, 'cpu.txt')
  rmSync(cpuFile, { force: true })
  return new Promise((resolve, reject) => {
    const started = now()
    const child = spawn(process.execPath, ['--require', CPU_PRELOAD, cli, ...args], { stdio: ['ignore', 'ignore', 'pipe'], cwd: repoRoot, env: { ...process.env, BENCH_CPU_FILE: cpuFile } })
    let stderr = ''
    child.stderr.on('data', (chunk) => { stderr += chunk })
    child.on('error', reject)
    child.on('exit', (code) => {
      const ms = now() - started
      const cpu = existsSync(cpuFile) ? Number(readFileSync(cpuFile, 'utf8').trim()) : null
      resolve({ ms, cpu, code, stderr })
    })
  })
}

async function ports () {
  return { proxy: await freePort(), egress: await freePort(), ops: await freePort(), admin: await freePort() }
}

function plainConfig (dir, p) {
  return [
    'service: bench',
    `stateDir: ${join(dir, 'state')}`,
    'listen:',
    `  proxy: { host: 127.0.0.1, port: ${p.proxy} }`,
    `  ops:   { host: 127.0.0.1, port: ${p.ops} }`,
    `  admin: { host: 127.0.0.1, port: ${p.admin} }`,
    'upstreams:',
    `  app: { url: "http://127.0.0.1:${p.upstream}" }`,
    'routes:',
    '  - match: { pathPrefix: / }',
    '    upstream: app',
    'featureFlags: { checkout: true }',
    'logging: { level: info, accessLog: false }',
    ''
  ].join('\n')
}

/** Every feature that needs no server besides the upstream (no etcd fleet, no flag provider module). */
function fullConfig (dir, p) {
  writeFileSync(join(dir, 'flags.json'), JSON.stringify({
    flags: {
      'new-search': { state: 'ENABLED', variants: { on: true, off: false }, defaultVariant: 'on' }
    }
  }))
  writeFileSync(join(dir, 'fallback.json'), '{"items":[]}\n')
  const webhook = `http://127.0.0.1:${p.upstream}/hook`
  return [
    'service: bench',
    'version: v1',
    `stateDir: ${join(dir, 'state')}`,
    'listen:',
    `  proxy:  { host: 127.0.0.1, port: ${p.proxy}, trustedProxies: [10.0.0.0/8] }`,
    `  egress: { host: 127.0.0.1, port: ${p.egress} }`,
    `  ops:    { host: 127.0.0.1, port: ${p.ops} }`,
    `  admin:  { host: 127.0.0.1, port: ${p.admin} }`,
    'upstreams:',
    '  app:',
    `    endpoints: ["http://127.0.0.1:${p.upstream}", "http://127.0.0.1:${p.upstream2}"]`,
    '    critical: true',
    '    balance: least_request',
    '    healthCheck: { path: /health, intervalMs: 5s }',
    '    failover: standby',
    '    failbackAfter: 30s',
    `  standby: { url: "http://127.0.0.1:${p.upstream}" }`,
    `  payments: { url: "http://127.0.0.1:${p.upstream}" }`,
    'routes:',
    '  - name: search',
    '    match: { pathPrefix: /search, methods: [GET] }',
    '    upstream: app',
    '    killSwitch: new-search',
    '    retries: { attempts: 2 }',
    '    rateLimit: { requestsPerSecond: 100, burst: 200, key: client }',
    '    fallback: { staleIfError: 5m, cache: { maxEntries: 1000 }, status: 200, file: fallback.json, contentType: application/json }',
    '  - name: checkout',
    '    match: { pathPrefix: /checkout }',
    '    upstream: payments',
    '    killSwitch: checkout',
    '    fault: { abortPercent: 0, delayPercent: 0, flag: checkout-chaos }',
    '  - name: outbound',
    '    match: { pathPrefix: / }',
    '    upstream: payments',
    '    listener: egress',
    '  - name: rest',
    '    match: { pathPrefix: / }',
    '    upstream: app',
    'featureFlags: { checkout: true, checkout-chaos: false }',
    'flagSource: { type: flagd-file, path: flags.json }',
    'circuitBreakers:',
    '  app: { failureThreshold: 0.5, volumeThreshold: 20, maxConcurrentRequests: 500 }',
    '  payments: { failureThreshold: 0.3, volumeThreshold: 10 }',
    'rollbackTriggers:',
    '  - { name: errors, metric: error_rate, threshold: 0.05, window: 5m, action: rollback, route: search }',
    '  - { name: slow, metric: p99_latency, threshold: 2000, window: 2m, action: notify }',
    '  - { name: payments, metric: error_rate, threshold: 0.2, window: 1m, action: circuitBreak, upstream: payments }',
    '  - { name: checkout, metric: error_rate, threshold: 0.2, window: 1m, action: killSwitch, flags: [checkout], route: checkout }',
    'rollback:',
    `  type: webhook`,
    `  url: ${webhook}`,
    'notifications:',
    `  slackWebhookUrl: ${webhook}`,
    '  slackChannel: "#incidents"',
    '  pagerDutyRoutingKey: bench',
    `  pagerDutyUrl: ${webhook}`,
    `  webhooks: [${webhook}]`,
    `  alertmanager: { urls: ["http://127.0.0.1:${p.upstream}"] }`,
    'verification:',
    '  synthetics: [{ route: search, path: /search }]',
    `tracing: { otlpEndpoint: "http://127.0.0.1:${p.upstream}", sampleRatio: 0.01 }`,
    'limits: { maxInFlight: 10000, maxConnections: 10000 }',
    'logging: { level: info, accessLog: 0.01 }',
    ''
  ].join('\n')
}

/** A tiny upstream that answers everything 200, in this process (it idles while we measure). */
async function startUpstream () {
  const { createServer } = await import('node:http')
  const server = createServer((req, res) => { req.resume(); res.end('ok\n') })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  return server
}

const stats = (xs) => ({ median: median(xs), min: Math.min(...xs), max: Math.max(...xs) })
/** Wall-clock and CPU milliseconds of each run. */
const summary = (runs) => ({ n: runs.length, wall: stats(runs.map((r) => r.ms)), cpu: stats(runs.map((r) => r.cpu).filter((c) => c !== null)) })
const fmt = (ms) => Number.isFinite(ms) ? `${Math.round(ms)} ms` : '–'

async function main () {
  if (!existsSync(cli)) throw new Error(`${cli} not found (run \`npm run build\`)`)
  const loadBefore = loadavg()[0]
  const upstream = await startUpstream()
  const upstream2 = await startUpstream()
  const upstreamPort = upstream.address().port
  const results = {}

  for (const [name, make] of [['plain', plainConfig], ['full', fullConfig]]) {
    const dir = join(tmp, name)
    mkdirSync(dir, { recursive: true })
    const p = { ...await ports(), upstream: upstreamPort, upstream2: upstream2.address().port }
    const config = join(dir, 'breakwater.yaml')
    writeFileSync(config, make(dir, p))
    await timeToLive(config, p.ops) // a first start off the books: it writes the admin token, warms the page cache
    const xs = []
    for (let i = 0; i < runs; i++) {
      xs.push(await timeToLive(config, p.ops))
      log(`start → /live, ${name}: ${fmt(xs.at(-1).ms)}, CPU ${fmt(xs.at(-1).cpu)}`)
    }
    results[`start → /live, ${name} config`] = summary(xs)
  }

  {
    const dir = join(tmp, 'operator')
    mkdirSync(dir, { recursive: true })
    const p = { ...await ports(), upstream: upstreamPort }
    const config = join(dir, 'breakwater.yaml')
    writeFileSync(config, plainConfig(dir, p))
    const sidecar = startSidecar(config)
    while (await status(`http://127.0.0.1:${p.ops}/live`) !== 200) {
      if (sidecar.child.exitCode !== null) throw new Error(`the sidecar exited: ${sidecar.stderr()}`)
      await sleep(20)
    }
    const xs = []
    for (let i = 0; i <= runs; i++) {
      const kill = await runCli(['kill', 'checkout', '--reason', 'startup bench', '--config', config])
      if (kill.code !== 0) throw new Error(`breakwater kill exited ${kill.code}: ${kill.stderr}`)
      const restore = await runCli(['restore', 'checkout', '--reason', 'startup bench', '--config', config])
      if (restore.code !== 0) throw new Error(`breakwater restore exited ${restore.code}: ${restore.stderr}`)
      if (i === 0) continue // the first one off the books
      xs.push(kill)
      log(`breakwater kill: ${fmt(kill.ms)}, CPU ${fmt(kill.cpu)}`)
    }
    results['`breakwater kill` round trip (process start to exit)'] = summary(xs)
    await stop(sidecar.child)
  }
  upstream.close()
  upstream2.close()

  const lines = [
    `${label}: Node ${process.version}, ${cpus().length} CPUs (${cpus()[0]?.model ?? '?'}), ${Math.round(totalmem() / 2 ** 30)} GiB; ` +
      `${runs} fresh processes each; load average ${loadBefore.toFixed(2)} before, ${loadavg()[0].toFixed(2)} after`,
    '',
    '| measurement | median | min | max | CPU time, median |',
    '|---|---:|---:|---:|---:|',
    ...Object.entries(results).map(([what, s]) => `| ${what} | ${fmt(s.wall.median)} | ${fmt(s.wall.min)} | ${fmt(s.wall.max)} | ${fmt(s.cpu.median)} |`),
    ''
  ]
  process.stdout.write(lines.join('\n'))
  if (values.json !== undefined) writeFileSync(values.json, JSON.stringify({ label, node: process.version, runs, loadavg: [loadBefore, loadavg()[0]], results }, null, 2) + '\n')
}

main().then(() => process.exit(0), (err) => {
  process.stderr.write(`${err.stack ?? err}\n`)
  process.exit(1)
})
