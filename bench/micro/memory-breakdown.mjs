// Where a target's memory goes, idle and holding 1,000 keep-alive connections: the bench's
// `memory` scenario (a fresh process per round, 1,000 closed-loop connections, sampled 2 s after
// all are accepted) with a probe preloaded into the target (memory-probe.cjs, `--require`) that
// writes `process.memoryUsage()`, V8's heap spaces, its GC counts and /proc/self/smaps(_rollup)
// on SIGUSR2, at idle and while holding. Targets as in bench/run.mjs (`node-floor`, `node-http`,
// `breakwater`, `breakwater-full`...).
//
//   node bench/micro/memory-breakdown.mjs --targets node-http,node-floor,breakwater,breakwater-full --rounds 3
//     --snapshot idle|hold   also a heap snapshot (it forces a full GC first: the live heap) into the probe folder
//     --out FILE             every round's figures as JSON
//   MEMPROBE_ALLOC=1         V8's sampling heap profiler from idle to holding (<pid>-alloc.json, what allocates)
//   BWROOT=DIR               the Breakwater checkout whose dist/ the breakwater targets run (default: this one)
import { mkdtempSync, readFileSync, existsSync, writeFileSync, mkdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
const here = dirname(fileURLToPath(import.meta.url))
const root = join(here, '..', '..')
const { startUpstream, startTarget } = await import(join(root, 'bench/lib/targets.mjs'))
const { stopProcess, sleep, killAllNow } = await import(join(root, 'bench/lib/processes.mjs'))
const { treeRssKiB, acceptedOnPort } = await import(join(root, 'bench/lib/procfs.mjs'))
const { runLoad } = await import(join(root, 'bench/lib/load.mjs'))
const { values } = parseArgs({ options: { targets: { type: 'string' }, rounds: { type: 'string', default: '3' }, snapshot: { type: 'string' }, out: { type: 'string' }, hold: { type: 'string', default: '2' } } })
const targets = values.targets.split(',')
const tmp = mkdtempSync(join(tmpdir(), 'bw-memory-'))
const probeDir = join(tmp, 'probe'); mkdirSync(probeDir)
const upstream = await startUpstream({ tmp, benchDir: join(root, 'bench') })
process.env.NODE_OPTIONS = `--require ${join(here, 'memory-probe.cjs')}`
process.env.MEMPROBE_DIR = probeDir
console.error('probe dir', probeDir)
if (values.snapshot === 'idle') process.env.MEMPROBE_SNAPSHOT = '0'
if (values.snapshot === 'hold') process.env.MEMPROBE_SNAPSHOT = '1'
process.on('SIGINT', () => { killAllNow(); process.exit(1) })
async function probe (pid, tag) {
  const f = join(probeDir, `${pid}-${tag}.json`)
  process.kill(pid, 'SIGUSR2')
  for (let i = 0; i < 600 && !existsSync(f); i++) await sleep(100)
  await sleep(200)
  return JSON.parse(readFileSync(f, 'utf8'))
}
const results = []
const mib = (k) => (k / 1024).toFixed(1)
for (let round = 0; round < Number(values.rounds); round++) {
  for (const name of targets) {
    const t = await startTarget(name, { tmp, repoRoot: process.env.BWROOT ?? root, benchDir: join(root, 'bench'), upstream, instance: round })
    const pids = t.pids()
    const mainPid = pids[0]
    await sleep(500)
    const rssIdle = treeRssKiB(pids)
    const idle = await probe(mainPid, 0)
    const port = Number(new URL(t.url).port)
    let instance
    let hold = null
    const t0 = Date.now()
    const load = runLoad({ url: t.url, connections: 1000, duration: 30, onInstance: (i) => { instance = i } })
    while (acceptedOnPort(t.pids(), port) < 1000 && Date.now() - t0 < 20000) await sleep(250)
    const connectS = (Date.now() - t0) / 1000
    await sleep(Number(values.hold) * 1000)
    const rssHold = treeRssKiB(t.pids())
    hold = await probe(mainPid, 1)
    instance.stop()
    const r = await load
    await stopProcess(t.proc)
    const row = { name, round, rssIdle, rssHold, connectS, reqs: r.responses, errors: r.errors, idle, hold }
    results.push(row)
    const h = hold.mem; const i = idle.mem
    console.error(`gc ${JSON.stringify(hold.gcs)} reqs ${r.responses} | r${round + 1} ${name.padEnd(16)} idle ${mib(rssIdle)} hold ${mib(rssHold)} MiB (accept ${connectS}s, ${Math.round(r.reqPerSec)} req/s, err ${r.errors}) | heapUsed ${mib(i.heapUsed / 1024)}→${mib(h.heapUsed / 1024)} heapTotal ${mib(i.heapTotal / 1024)}→${mib(h.heapTotal / 1024)} ext ${mib(i.external / 1024)}→${mib(h.external / 1024)} ab ${mib(i.arrayBuffers / 1024)}→${mib(h.arrayBuffers / 1024)} | new ${mib(idle.spaces.new_space.size / 1024)}→${mib(hold.spaces.new_space.size / 1024)} old ${mib(idle.spaces.old_space.size / 1024)}→${mib(hold.spaces.old_space.size / 1024)} | anon ${mib(idle.smaps.Anonymous)}→${mib(hold.smaps.Anonymous)} file ${mib(idle.smaps.Rss - idle.smaps.Anonymous)}→${mib(hold.smaps.Rss - hold.smaps.Anonymous)}`)
    await sleep(300)
  }
}
if (values.out) writeFileSync(values.out, JSON.stringify(results, null, 1))
// medians
const med = (a) => { const s = [...a].sort((x, y) => x - y); return s[Math.floor(s.length / 2)] }
for (const name of targets) {
  const rs = results.filter((r) => r.name === name)
  console.log(`${name}: idle ${mib(med(rs.map((r) => r.rssIdle)))} (${rs.map((r) => mib(r.rssIdle)).join(', ')}) hold ${mib(med(rs.map((r) => r.rssHold)))} (${rs.map((r) => mib(r.rssHold)).join(', ')}) MiB`)
}
await stopProcess(upstream.proc)
killAllNow()
