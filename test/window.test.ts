/**
 * Trigger windows with running sums (SPEC §15): exact against a brute-force recount, small and
 * fixed memory per route, freed when a reload removes the route.
 */
import t from 'tap'
import { SecondWindow, RunningSum, emptySums, latencyBin, LATENCY_BINS, type WindowSums } from '../src/proxy/window.js'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar, testSidecarInput } from './helpers/sidecar.js'
import { send } from './helpers/http.js'
import { random } from './helpers/random.js'
import { resolveConfig } from '../src/config/load.js'

interface Second { requests: number, errors: number, bins: number[] }

/** Brute force: every unit in [from, to] recounted from what was recorded, second by second. */
function recount (seconds: Map<number, Second>, unitSeconds: number, from: number, to: number): WindowSums {
  const out = emptySums(true)
  for (let u = from; u <= to; u++) {
    for (let s = u * unitSeconds; s < (u + 1) * unitSeconds; s++) {
      const x = seconds.get(s)
      if (x === undefined) continue
      out.requests += x.requests
      out.errors += x.errors
      for (let b = 0; b < LATENCY_BINS; b++) (out.latency as Float64Array)[b] += x.bins[b] as number
    }
  }
  return out
}

t.test('running sums agree exactly with a brute-force recount, over many window lengths, gaps and wrap-around', async (t) => {
  const rnd = random(20261202)
  const routes = [new SecondWindow(), new SecondWindow(), new SecondWindow()]
  const recorded = routes.map(() => new Map<number, Second>())
  const windowsMs = [1000, 2000, 5000, 10_000, 60_000, 125_000, 126_000, 127_000, 300_000, 1_800_000, 3_600_000]
  const running = windowsMs.map((ms) => new RunningSum(ms, true))
  const start = 1_764_000_000
  // Three simulated hours: the minutes ring (64) wraps almost three times, the seconds ring (128) 80 times.
  const end = start + 3 * 3600
  let checks = 0
  let mismatches = 0
  let sec = start
  while (sec < end) {
    // Now and then a quiet stretch longer than a ring, so stale slots must never count.
    if (rnd() < 0.002) sec += Math.floor(rnd() * 400)
    for (let r = 0; r < routes.length; r++) {
      const n = rnd() < 0.3 ? 0 : Math.floor(rnd() * 12)
      for (let i = 0; i < n; i++) {
        const error = rnd() < 0.2
        const latencyMs = rnd() < 0.05 ? -1 : Math.floor(rnd() ** 3 * 70_000)
        const at = sec * 1000 + Math.floor(rnd() * 1000)
        routes[r]!.record(at, error, latencyMs)
        const x = recorded[r]!.get(sec) ?? { requests: 0, errors: 0, bins: new Array(LATENCY_BINS).fill(0) }
        x.requests++
        if (error) x.errors++
        if (latencyMs >= 0) x.bins[latencyBin(latencyMs)]++
        recorded[r]!.set(sec, x)
      }
    }
    // Reads most seconds (several late, so stepping covers several units at once).
    if (rnd() < 0.8) {
      const nowMs = sec * 1000 + 999
      const check = rnd() < 0.03
      for (let w = 0; w < windowsMs.length; w++) {
        const rs = running[w]!
        const got = rs.read(routes, nowMs, emptySums(true))
        if (!check) continue
        checks++
        const cur = Math.floor(sec / rs.unitSeconds)
        const want = emptySums(true)
        for (const m of recorded) {
          const one = recount(m, rs.unitSeconds, cur - rs.units + 1, cur)
          want.requests += one.requests
          want.errors += one.errors
          for (let b = 0; b < LATENCY_BINS; b++) (want.latency as Float64Array)[b] += (one.latency as Float64Array)[b] as number
        }
        if (got.requests !== want.requests || got.errors !== want.errors || got.latency!.some((v, b) => v !== want.latency![b])) {
          mismatches++
          if (mismatches <= 3) t.fail(`window ${windowsMs[w]} ms at second ${sec}: got ${got.requests}/${got.errors}, want ${want.requests}/${want.errors}`)
        }
      }
    }
    sec++
  }
  t.ok(checks > 1000, `${checks} comparisons`)
  t.equal(mismatches, 0, 'every comparison agreed exactly (requests, errors, every latency bin)')
  t.equal(running[0]!.unitSeconds, 1)
  t.equal(running[6]!.unitSeconds, 1, 'up to 126 s by the second')
  t.equal(running[7]!.unitSeconds, 60, 'longer windows by the minute')
  t.equal(running[10]!.units, 60, 'a 1-hour window is 60 minute units')

  // The ad-hoc sum of triage and verification agrees too, in the seconds it holds at full resolution.
  const last = sec - 1
  const summed = routes[0]!.sum(last - 60, last + 1, emptySums(true))
  const want = recount(recorded[0]!, 1, last - 60, last)
  t.equal(summed.requests, want.requests)
  t.equal(summed.errors, want.errors)
})

t.test('a trigger evaluation costs the same for a 1-hour window as for a 10-second one: a few buckets per second, not the window', async (t) => {
  /** Counts the buckets a reader touches. */
  class Counting extends SecondWindow {
    touched = 0
    override addUnit (unitSeconds: 1 | 60, u: number, into: WindowSums, sign: 1 | -1): void {
      this.touched++
      super.addUnit(unitSeconds, u, into, sign)
    }
  }
  for (const windowMs of [10_000, 600_000, 3_600_000]) {
    const w = new Counting()
    const rs = new RunningSum(windowMs, true)
    const start = 1_764_000_000
    const reads = 2 * 3600
    for (let sec = start; sec < start + reads; sec++) {
      w.record(sec * 1000 + 500, sec % 7 === 0, 20)
      rs.read([w], sec * 1000 + 999, emptySums(true))
    }
    const perRead = w.touched / reads
    t.ok(perRead <= 4, `${windowMs / 1000}s window: ${perRead.toFixed(2)} buckets per evaluation on average (a re-sum would touch ${Math.min(windowMs / 1000, 3600)})`)
  }
})

t.test('memory per route is small and fixed; a route without traffic holds none; a reload that removes a route frees its window', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const routes = [
    { name: 'a', match: { pathPrefix: '/a' }, upstream: 'app' },
    { name: 'b', match: { pathPrefix: '/b' }, upstream: 'app' },
    { name: 'quiet', match: { pathPrefix: '/quiet' }, upstream: 'app' }
  ]
  const triggers = [{ name: 'slow', metric: 'p99_latency', threshold: 1000, window: '1h', action: 'notify', minRequests: 1 }]
  const s = await startTestSidecar(t, { upstreams: { app: { url: up.url } }, routes, rollbackTriggers: triggers })
  for (let i = 0; i < 20; i++) {
    t.equal((await send(s.proxy, '/a')).status, 200)
    t.equal((await send(s.proxy, '/b')).status, 200)
  }
  const windowOf = (route: string): SecondWindow => {
    const stats = [...s.sidecar.dataPlane.stats.allRoutes()].find((x) => x.route === route)
    if (stats === undefined) throw new Error(`no stats for ${route}`)
    return stats.window
  }
  const bytesA = windowOf('a').bytes()
  t.ok(bytesA > 0, `route a holds ${bytesA} bytes`)
  t.ok(bytesA <= 64 * 1024, `at most 64 KiB per route, with a 1-hour trigger configured (was about 1.2 MB): ${bytesA}`)
  t.equal(windowOf('b').bytes(), bytesA, 'the same for every route, whatever its traffic')
  t.equal(windowOf('quiet').bytes(), 0, 'a route that saw no request holds no window')
  s.sidecar.triggers.evaluate()
  t.equal(s.sidecar.triggers.status()[0]?.requests, 40, 'the 1-hour trigger reads every request')

  const { config } = resolveConfig(testSidecarInput({ upstreams: { app: { url: up.url } }, routes: [routes[0], routes[2]], rollbackTriggers: triggers }, s.stateDir))
  await s.sidecar.apply(config)
  t.notOk([...s.sidecar.dataPlane.stats.allRoutes()].some((x) => x.route === 'b'), 'the removed route\'s stats and window are freed')
  t.equal(windowOf('a').bytes(), bytesA, 'a route the reload kept keeps its window')
  s.sidecar.triggers.evaluate()
  t.equal(s.sidecar.triggers.status()[0]?.requests, 20, 'the trigger no longer counts the removed route')
})
