/**
 * How the process ends after SIGTERM (main.ts `exitAfterShutdown`): the shutdown's own result,
 * or the backstop's exit 1 when the tear-down hangs. Driven with shutdowns that settle when the
 * test says, and hooks that record instead of exiting.
 */
import t from 'tap'
import { exitAfterShutdown } from '../src/main.js'

interface Ending {
  /** Exit codes asked for, in order (the process would end at the first). */
  exits: number[]
  backstops: number[]
  failures: unknown[]
  settled: number[]
}

/** Run `exitAfterShutdown` on `shutdown`; resolves at the first exit asked for. */
async function ending (shutdown: Promise<void>, budgetMs: number): Promise<Ending> {
  const seen: Ending = { exits: [], backstops: [], failures: [], settled: [] }
  // The hooks' timers are unref'd, as in the process: keep this one alive until the first exit.
  const alive = setInterval(() => {}, 1000)
  try {
    await new Promise<void>((resolve) => {
      exitAfterShutdown(shutdown, budgetMs, {
        backstop: (afterMs) => { seen.backstops.push(afterMs) },
        failed: (err) => { seen.failures.push(err) },
        settled: (code) => { seen.settled.push(code) },
        exit: (code) => { seen.exits.push(code); resolve() }
      })
    })
  } finally {
    clearInterval(alive)
  }
  return seen
}

t.test('a shutdown that finishes: exit 0, no backstop', async (t) => {
  const seen = await ending(Promise.resolve(), 10)
  t.same(seen.exits, [0])
  t.same(seen.settled, [0])
  t.same(seen.backstops, [])
})

t.test('a shutdown that fails: logged, exit 1', async (t) => {
  const err = new Error('state write failed')
  const seen = await ending(Promise.reject(err), 10)
  t.same(seen.exits, [1])
  t.equal(seen.failures[0], err)
  t.same(seen.backstops, [])
})

t.test('a shutdown that hangs: the backstop exits 1, after the budget or 1 s, whichever is longer', async (t) => {
  const at = performance.now()
  const seen = await ending(new Promise<void>(() => {}), 10)
  t.same(seen.exits, [1])
  t.same(seen.backstops, [1000], 'the backstop fired after 1,000 ms (the budget, 10 ms, is shorter)')
  t.ok(performance.now() - at >= 1000, 'not before')
  t.same(seen.settled, [])
})

t.test('a shutdown that finishes after its budget, before the busy event loop ran the backstop: still exit 0', async (t) => {
  // The shutdown's last step runs just before the backstop is due and keeps the event loop busy
  // past it: when the step ends, the backstop's timer is due too. The shutdown settled first.
  const at = performance.now()
  const shutdown = new Promise<void>((resolve) => {
    setTimeout(() => {
      while (performance.now() < at + 1200) { /* the busy last step */ }
      resolve()
    }, 990)
  })
  const seen = await ending(shutdown, 10)
  t.same(seen.exits, [0], 'its own result, not the backstop\'s 1')
  t.same(seen.backstops, [], 'no "did not finish in time" line')
})
