/**
 * The collection after start-up (src/ops/startup-memory.ts): it runs, it frees what is no
 * longer referenced, and it leaves V8's `gc` unexposed to the code that follows; the real
 * binary runs it once it listens, and serves after it.
 */
import t from 'tap'
import { runInNewContext } from 'node:vm'
import { releaseStartupGarbage } from '../src/ops/startup-memory.js'
import { startUpstream } from './helpers/upstream.js'
import { startProcessWithin, withoutTapHooks } from './helpers/process.js'
import { oneRoute } from './helpers/sidecar.js'
import { send } from './helpers/http.js'

t.test('garbage left behind is collected, and `gc` stays out of reach afterwards', async (t) => {
  t.equal(typeof (globalThis as { gc?: unknown }).gc, 'undefined', 'the test runs without --expose-gc')
  let garbage: Array<{ i: number, s: string }> | null = Array.from({ length: 300_000 }, (_, i) => ({ i, s: `item ${i}` }))
  t.equal(garbage.length, 300_000)
  const held = process.memoryUsage().heapUsed
  garbage = null
  const ms = releaseStartupGarbage()
  t.type(ms, 'number', 'V8\'s gc was reached')
  t.ok((ms as number) >= 0)
  const after = process.memoryUsage().heapUsed
  // 300,000 objects and strings: well over 10 MB; only a collection frees them this soon.
  t.ok(held - after > 10 * 1024 * 1024, `heap in use fell from ${held} to ${after} bytes`)
  t.equal(typeof (globalThis as { gc?: unknown }).gc, 'undefined', 'no gc on this context')
  t.equal(runInNewContext('typeof gc'), 'undefined', 'nor on a context made afterwards: the flag is off again')
})

t.test('the binary collects once it listens, says so at debug level, and serves', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const bw = await startProcessWithin(t, { ...oneRoute(up.url), logging: { level: 'debug' } }, 30_000, withoutTapHooks)
  const line = await bw.waitForLine((l) => l.event === 'startup_memory')
  t.type(line.gcMs, 'number')
  t.ok((line.gcMs as number) >= 0)
  t.ok((line.rssBeforeMiB as number) > 0 && (line.rssAfterMiB as number) > 0, `RSS ${String(line.rssBeforeMiB)} -> ${String(line.rssAfterMiB)} MiB`)
  const order = bw.lines.map((l) => l.event === 'startup_memory' ? 'gc' : l.msg === 'listening' ? 'listening' : null).filter((e) => e !== null)
  t.same(order, ['listening', 'gc'], 'after the listeners are bound')
  const res = await send(bw.proxy, '/after')
  t.equal(res.status, 200)
})
