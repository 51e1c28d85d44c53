#!/usr/bin/env node
// Soak: steady load through one Breakwater target for minutes, its resident memory sampled
// every 10 s. Memory that grows with the number of requests served (a leak) shows as a slope;
// memory that only follows the load levels off after the first minute.
//
//   node bench/soak.mjs [--minutes 8] [--rate 2000] [--connections 20] [--target breakwater-stages]
//
// Upstream (nginx when installed) and load generator on CPU 0, the target on CPU 1, as in
// bench/run.mjs. Needs a built dist/ (npm run build).
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { processTree, treeRssKiB, treeCpuNs } from './lib/procfs.mjs'
import { pinTree, stopAll, killAllNow } from './lib/processes.mjs'
import { runLoad } from './lib/load.mjs'
import { startUpstream, startTarget, LOADGEN_CPU, PROXY_CPU } from './lib/targets.mjs'

const benchDir = dirname(fileURLToPath(import.meta.url))
const repoRoot = resolve(benchDir, '..')
const { values } = parseArgs({
  options: {
    minutes: { type: 'string', default: '8' },
    rate: { type: 'string', default: '2000' },
    connections: { type: 'string', default: '20' },
    target: { type: 'string', default: 'breakwater-stages' }
  }
})
const minutes = Number(values.minutes)
const rate = Number(values.rate)
const connections = Number(values.connections)
const SAMPLE_S = 10

pinTree([process.pid], LOADGEN_CPU)
const tmp = mkdtempSync(join(tmpdir(), 'breakwater-soak-'))
process.on('SIGINT', () => { killAllNow(); process.exit(130) })

try {
  const upstream = await startUpstream({ tmp, benchDir, forceNode: false })
  const target = await startTarget(values.target, { tmp, repoRoot, benchDir, upstream })
  const pids = () => processTree(target.proc.pid)
  pinTree(pids(), PROXY_CPU)
  // Warm: code optimised, pools open, before the first sample.
  await runLoad({ url: target.url, connections, duration: 5, overallRate: rate })
  const samples = []
  let served = 0
  const sample = () => {
    const at = samples.length * SAMPLE_S
    samples.push({ at, rssMiB: treeRssKiB(pids()) / 1024, cpuS: treeCpuNs(pids()) / 1e9 })
  }
  sample()
  const durationS = minutes * 60
  const during = Array.from({ length: Math.floor(durationS / SAMPLE_S) }, (_, i) => ({ atSeconds: (i + 1) * SAMPLE_S, fn: sample }))
  const result = await runLoad({ url: target.url, connections, duration: durationS, overallRate: rate, during })
  served = result.responses
  console.log(`### Soak: ${values.target}, ${minutes} min at ${rate} req/s over ${connections} connections (${new Date().toISOString()})\n`)
  console.log(`${served.toLocaleString('en')} responses, ${result.non2xx} non-2xx, ${result.errors} errors, ${result.timeouts} timeouts; p99 ${result.p99.toFixed(1)} ms\n`)
  console.log('| minute | RSS MiB (min–max of its samples) |')
  console.log('|---:|---|')
  const perMinute = []
  for (let m = 0; m < minutes; m++) {
    const inMinute = samples.filter((s) => s.at >= m * 60 && s.at < (m + 1) * 60 + (m === minutes - 1 ? 1 : 0))
    const rss = inMinute.map((s) => s.rssMiB)
    perMinute.push(Math.max(...rss))
    console.log(`| ${m + 1} | ${Math.min(...rss).toFixed(1)}–${Math.max(...rss).toFixed(1)} |`)
  }
  // Least-squares slope of RSS over the samples after the first two minutes.
  const late = samples.filter((s) => s.at >= 120)
  if (late.length < 2) process.exit(0) // too short a run for a slope
  const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length
  const mx = mean(late.map((s) => s.at))
  const my = mean(late.map((s) => s.rssMiB))
  const slope = late.reduce((a, s) => a + (s.at - mx) * (s.rssMiB - my), 0) / late.reduce((a, s) => a + (s.at - mx) ** 2, 0)
  console.log(`\nRSS slope after minute 2: ${(slope * 60).toFixed(2)} MiB per minute (${(slope * 60 * 1e6 / (rate * 60)).toFixed(2)} bytes per request); max of minute 2 ${perMinute[1]?.toFixed(1)} MiB, of the last minute ${perMinute.at(-1).toFixed(1)} MiB`)
} finally {
  await stopAll()
  rmSync(tmp, { recursive: true, force: true })
}
