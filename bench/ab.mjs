// Two builds of Breakwater side by side: the same targets from this checkout and from another
// built checkout (`--before DIR`, e.g. a `git worktree` of an older commit after `npm run
// build`), measured in short alternating runs so that both see the same machine. Reports the
// median proxy CPU µs per request of each target and build, and each target's ratio to
// `breakwater` of the same build in the same round.
//
//   node bench/ab.mjs --before ../old --targets breakwater,breakwater-log --rounds 12 --duration 3
//
// `--before-flags` and `--after-flags` start each build's breakwater targets with those Node
// flags (space-separated) instead of BENCH_NODE_FLAGS or the shipped ones; with them, `--before`
// may be left out to weigh a flag on this checkout against itself:
//
//   node bench/ab.mjs --before-flags='--max-semi-space-size=8' --after-flags='--max-semi-space-size=8 --optimize-for-size'
import { parseArgs } from 'node:util'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { runLoad } from './lib/load.mjs'
import { treeCpuNs } from './lib/procfs.mjs'
import { median, min, max } from './lib/stats.mjs'
import { startUpstream, startTarget } from './lib/targets.mjs'
import { stopAll, killAllNow, sleep } from './lib/processes.mjs'

const { values } = parseArgs({
  options: {
    before: { type: 'string' },
    targets: { type: 'string', default: 'breakwater,breakwater-log' },
    rounds: { type: 'string', default: '12' },
    duration: { type: 'string', default: '3' },
    'before-flags': { type: 'string' },
    'after-flags': { type: 'string' }
  }
})
if (values.before === undefined && values['before-flags'] === undefined && values['after-flags'] === undefined) {
  process.stderr.write('usage: node bench/ab.mjs --before DIR | --before-flags=F --after-flags=F [--targets a,b] [--rounds N] [--duration S]\n')
  process.exit(2)
}
const benchDir = dirname(fileURLToPath(import.meta.url))
const builds = { before: resolve(values.before ?? join(benchDir, '..')), after: resolve(benchDir, '..') }
/** Node flags per build, when given: undefined leaves startTarget's default. */
const flagsOf = (given) => given === undefined ? undefined : given.split(/\s+/).filter(Boolean)
const flags = { before: flagsOf(values['before-flags']), after: flagsOf(values['after-flags']) }
const names = values.targets.split(',')
if (!names.includes('breakwater')) names.unshift('breakwater')
const rounds = Number(values.rounds)
const duration = Number(values.duration)
const tmp = mkdtempSync(join(tmpdir(), 'breakwater-ab-'))
process.on('SIGINT', () => { killAllNow(); process.exit(130) })

const upstream = await startUpstream({ tmp, benchDir, forceNode: false })
const runs = []
try {
  let instance = 0
  for (const [build, repoRoot] of Object.entries(builds)) {
    for (const name of names) {
      const live = await startTarget(name, { tmp, repoRoot, benchDir, upstream, instance: instance++, flags: flags[build] })
      runs.push({ build, name, live, usPerReq: [], ratio: [] })
      process.stderr.write(`${build} ${name}: ready\n`)
    }
  }
  for (const r of runs) await runLoad({ url: r.live.url, connections: 50, duration: 1 })
  for (let round = 0; round < rounds; round++) {
    // Rotate the order so no target always runs first or last in a round.
    const order = runs.map((_, i) => runs[(i + round) % runs.length])
    const perRound = new Map()
    for (const r of order) {
      await runLoad({ url: r.live.url, connections: 50, duration: 0.5 })
      const pids = r.live.pids()
      let cpu0 = 0n
      const res = await runLoad({ url: r.live.url, connections: 50, duration, onStart: () => { cpu0 = treeCpuNs(pids) } })
      const us = Number(treeCpuNs(pids) - cpu0) / 1000 / res.responses
      r.usPerReq.push(us)
      perRound.set(`${r.build} ${r.name}`, us)
      process.stderr.write(`round ${round + 1} ${r.build.padEnd(6)} ${r.name.padEnd(20)} ${us.toFixed(1)} µs/req ${Math.round(res.reqPerSec)} req/s\n`)
    }
    for (const r of runs) r.ratio.push(perRound.get(`${r.build} ${r.name}`) / perRound.get(`${r.build} breakwater`))
    await sleep(100)
  }
} finally {
  await stopAll()
  rmSync(tmp, { recursive: true, force: true })
}

const fmt = (x) => x.toFixed(1)
const lines = [
  `${rounds} rounds × ${duration} s at c=50, ${upstream.kind} upstream; before: ${builds.before}${flags.before === undefined ? '' : ` with ${flags.before.join(' ')}`}; after: ${builds.after}${flags.after === undefined ? '' : ` with ${flags.after.join(' ')}`}`,
  '',
  '| build | target | proxy CPU µs/req (median) | min–max | × breakwater, same build and round (median) | min–max |',
  '|---|---|---:|---:|---:|---:|'
]
for (const r of runs) {
  lines.push(`| ${r.build} | ${r.name} | ${fmt(median(r.usPerReq))} | ${fmt(min(r.usPerReq))}–${fmt(max(r.usPerReq))} | ${median(r.ratio).toFixed(3)} | ${min(r.ratio).toFixed(3)}–${max(r.ratio).toFixed(3)} |`)
}
process.stdout.write(lines.join('\n') + '\n')
