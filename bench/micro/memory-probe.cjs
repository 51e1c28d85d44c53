// Preloaded (--require) into a target by memory-breakdown.mjs: on SIGUSR2, writes its memory
// breakdown to $MEMPROBE_DIR/<pid>-<n>.json (n = 0 idle, 1 holding).
const fs = require('node:fs')
const v8 = require('node:v8')
const path = require('node:path')
const { PerformanceObserver, constants } = require('node:perf_hooks')
let n = 0
const gcs = { minor: 0, major: 0, other: 0, ms: 0 }
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) {
    const k = e.detail?.kind ?? e.kind
    if (k === constants.NODE_PERFORMANCE_GC_MINOR) gcs.minor++
    else if (k === constants.NODE_PERFORMANCE_GC_MAJOR) gcs.major++
    else gcs.other++
    gcs.ms += e.duration
  }
}).observe({ entryTypes: ['gc'] })
let session = null
process.on('SIGUSR2', () => {
  const dir = process.env.MEMPROBE_DIR
  const tag = n++
  const out = { mem: process.memoryUsage(), spaces: {}, smaps: {}, gcs: { ...gcs } }
  for (const s of v8.getHeapSpaceStatistics()) out.spaces[s.space_name] = { size: s.space_size, used: s.space_used_size }
  for (const line of fs.readFileSync('/proc/self/smaps_rollup', 'utf8').split('\n')) {
    const m = /^(\w+):\s+(\d+) kB/.exec(line)
    if (m) out.smaps[m[1]] = Number(m[2])
  }
  const maps = {}
  let cur = null
  for (const line of fs.readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    const h = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line)
    if (h) { cur = h[1] || '[anon]'; if (cur.startsWith('/')) cur = path.basename(cur); continue }
    const m = /^Rss:\s+(\d+) kB/.exec(line)
    if (m && cur) maps[cur] = (maps[cur] || 0) + Number(m[1])
  }
  out.maps = Object.fromEntries(Object.entries(maps).sort((a, b) => b[1] - a[1]).slice(0, 12))
  const finish = () => {
    if (process.env.MEMPROBE_SNAPSHOT === String(tag)) out.snapshot = v8.writeHeapSnapshot(path.join(dir, `${process.pid}-${tag}.heapsnapshot`))
    fs.writeFileSync(path.join(dir, `${process.pid}-${tag}.json`), JSON.stringify(out))
  }
  if (process.env.MEMPROBE_ALLOC === '1') {
    const inspector = require('node:inspector')
    if (tag === 0) {
      session = new inspector.Session(); session.connect()
      session.post('HeapProfiler.startSampling', { samplingInterval: 4096, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: true }, (err) => { if (err) out.allocErr = String(err); finish() })
      return
    }
    if (tag === 1 && session) {
      session.post('HeapProfiler.stopSampling', (err, r) => {
        if (err) out.allocErr = String(err)
        else fs.writeFileSync(path.join(dir, `${process.pid}-alloc.json`), JSON.stringify(r.profile))
        finish()
      })
      return
    }
  }
  finish()
})
