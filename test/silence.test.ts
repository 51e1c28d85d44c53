/**
 * The silence sweep (SPEC §14's `routes[].idleTimeoutMs`): the list threaded through the watched
 * exchanges against a plain Set, and when the sweep calls a client silent. What a real client
 * socket does with it is tested end to end in slow-clients.test.ts.
 */
import t from 'tap'
import type { Socket } from 'node:net'
import { SilenceWatch, type Silent } from '../src/proxy/silence.js'
import { random } from './helpers/random.js'

/** A watched exchange whose socket byte counts the test moves by hand. */
class Watched implements Silent {
  readonly counts = { bytesRead: 0, bytesWritten: 0 }
  readonly clientSocket = this.counts as unknown as Socket
  seenRead = -1
  seenWritten = -1
  quietSince = 0
  silencePrev: Silent | null = null
  silenceNext: Silent | null = null
  silentCalls = 0
  headDueAt = 0
  overdueCalls = 0
  constructor (readonly name: number, readonly silenceLimitMs: number, private readonly keepWatching = false, readonly headLimitMs = 0) {}
  onSilent (): boolean {
    this.silentCalls++
    return this.keepWatching
  }

  onHeadOverdue (): boolean {
    this.overdueCalls++
    this.headDueAt = 0
    return this.keepWatching
  }
}

/** Who the sweep visits: each is silent at once (limit 0), kept watched, and counted. */
function visited (watch: SilenceWatch, all: Watched[]): number[] {
  for (const w of all) { w.silentCalls = 0; w.seenRead = 0; w.seenWritten = 0 }
  watch.sweep(1e9)
  return all.filter((w) => w.silentCalls > 0).map((w) => w.name).sort((a, b) => a - b)
}

t.test('the watched list matches a Set through 5,000 random watches and unwatches', async (t) => {
  const watch = new SilenceWatch()
  t.teardown(() => { watch.stop() })
  const all = Array.from({ length: 40 }, (_, i) => new Watched(i, 0, true))
  const model = new Set<number>()
  const next = random(15)
  let mismatches = 0
  for (let step = 0; step < 5000; step++) {
    const w = all[Math.floor(next() * all.length)] as Watched
    if (model.has(w.name) || next() < 0.3) {
      watch.unwatch(w) // also of one not watched: nothing
      model.delete(w.name)
    } else {
      watch.watch(w)
      model.add(w.name)
    }
    if (step % 50 === 0 && JSON.stringify(visited(watch, all)) !== JSON.stringify([...model].sort((a, b) => a - b))) mismatches++
    if (watch.size !== model.size) mismatches++
  }
  t.equal(mismatches, 0, 'the sweep visits exactly the watched ones, and size counts them')
  for (const name of [...model]) watch.unwatch(all[name] as Watched)
  t.equal(watch.size, 0, 'all unwatched')
  t.same(visited(watch, all), [], 'the sweep visits nobody')
})

t.test('a client is silent once its byte counts have not moved for its limit', async (t) => {
  const watch = new SilenceWatch()
  t.teardown(() => { watch.stop() })
  const cut = new Watched(1, 300)
  const waiting = new Watched(2, 300, true)
  watch.watch(cut)
  watch.watch(waiting)
  watch.sweep(1000)
  t.equal(cut.quietSince, 1000, 'the first sweep notes the counts and the time')
  watch.sweep(1299)
  t.equal(cut.silentCalls, 0, 'not silent before its limit')
  cut.counts.bytesRead += 10
  watch.sweep(1299)
  t.equal(cut.quietSince, 1299, 'a byte read restarts the count')
  waiting.counts.bytesWritten += 10
  watch.sweep(1400)
  t.equal(waiting.quietSince, 1400, 'so does a byte written')
  watch.sweep(1599)
  t.equal(cut.silentCalls, 1, 'silent 300 ms after its last byte: told')
  t.equal(watch.size, 1, 'and no longer watched once it says it was cut')
  watch.sweep(1800)
  t.equal(cut.silentCalls, 1, 'never told twice')
  t.equal(waiting.silentCalls, 1, 'one that goes on waiting is told')
  watch.sweep(1900)
  t.equal(waiting.silentCalls, 2, 'and told again at every sweep while silent')
  waiting.counts.bytesRead += 1
  watch.sweep(2000)
  t.equal(waiting.silentCalls, 2, 'until it moves a byte')
  watch.unwatch(waiting)
  t.equal(watch.size, 0, 'unwatched when it ends')
})

t.test('a pass run late by a stalled event loop judges silence at the time it was due', async (t) => {
  const watch = new SilenceWatch()
  t.teardown(() => { watch.stop() })
  const sending = new Watched(1, 300) // a pass every 30 ms
  const silent = new Watched(2, 300)
  watch.watch(sending)
  watch.watch(silent)
  // The passes run synchronously here, so the real timer cannot run one in between.
  const t0 = performance.now()
  watch.tick(t0 + 30)
  t.equal(sending.quietSince, t0 + 30, 'the first pass notes the counts')
  watch.tick(t0 + 60)
  // The loop stalls for 400 ms; the bytes `sending` sent meanwhile are not read yet.
  watch.tick(t0 + 460)
  t.equal(sending.silentCalls, 0, 'the late pass (judged at +90 ms) does not call the client that kept sending silent')
  t.equal(silent.silentCalls, 0, 'nor the other, silent for 60 ms when the pass was due')
  t.equal(watch.size, 2, 'both still watched')
  sending.counts.bytesRead += 100 // read once the loop polls again
  watch.tick(t0 + 490)
  t.equal(sending.quietSince, t0 + 490, 'the next pass, on time, sees its bytes')
  t.equal(sending.silentCalls, 0, 'and does not cut it')
  t.equal(silent.silentCalls, 1, 'the client that really sent nothing for 460 ms is cut by that pass')
  t.equal(watch.size, 1)
})

t.test('a loop that runs every pass late still cuts a silent client about on time', async (t) => {
  const watch = new SilenceWatch()
  t.teardown(() => { watch.stop() })
  const silent = new Watched(1, 300) // a pass every 30 ms
  watch.watch(silent)
  const t0 = performance.now()
  // Every pass 70 ms late: 100 ms apart instead of 30.
  let at = t0
  let cutAt = -1
  for (let i = 1; i <= 10 && cutAt === -1; i++) {
    at = t0 + 100 * i
    watch.tick(at)
    if (silent.silentCalls > 0) cutAt = at
  }
  const after = Math.round(cutAt - (t0 + 100)) // since the first pass saw it
  t.ok(cutAt !== -1, 'cut')
  t.ok(after >= 300, `no sooner than its limit after the first pass saw it (${after} ms)`)
  t.ok(after <= 300 + 100, `and within one pass after (${after} ms): a steady lag does not put it off`)
})

t.test('a response head not there by its deadline is told, once, judged at the time the pass was due', async (t) => {
  const watch = new SilenceWatch()
  t.teardown(() => { watch.stop() })
  const timed = new Watched(1, 60_000, false, 200) // a pass every 20 ms: a tenth of its timeoutMs
  const answered = new Watched(2, 60_000, true, 200)
  watch.watch(timed)
  watch.watch(answered)
  const t0 = performance.now()
  timed.headDueAt = t0 + 200
  answered.headDueAt = t0 + 200
  watch.tick(t0 + 20)
  watch.tick(t0 + 199)
  t.equal(timed.overdueCalls, 0, 'not before its deadline')
  answered.headDueAt = 0 // its head came
  watch.tick(t0 + 219)
  t.equal(timed.overdueCalls, 1, 'told at the first pass after its deadline')
  t.equal(answered.overdueCalls, 0, 'one whose head came is not')
  t.equal(watch.size, 1, 'and no longer watched once it says it is ended')
  t.equal(timed.silentCalls, 0, 'its client was not called silent')
  // The loop stalls: the pass due at +259 runs at +600; a head due at +265 that came during the
  // stall is read at the next poll, so the late pass judges at +259 and leaves it.
  answered.headDueAt = t0 + 265
  watch.tick(t0 + 239)
  watch.tick(t0 + 600)
  t.equal(answered.overdueCalls, 0, 'a late pass does not time out a head due after the pass was')
  watch.tick(t0 + 620)
  t.equal(answered.overdueCalls, 1, 'the next pass, on time, does')
})

t.test("the sweep runs at a tenth of the shortest limit it watches, the head's or the client's", async (t) => {
  const watch = new SilenceWatch()
  t.teardown(() => { watch.stop() })
  const w = new Watched(1, 60_000, true, 150)
  watch.watch(w)
  const every = (watch as unknown as { everyMs: number }).everyMs
  t.equal(every, 15, 'timeoutMs 150 with idleTimeoutMs 60 s: a pass every 15 ms')
  const none = new SilenceWatch()
  t.teardown(() => { none.stop() })
  none.watch(new Watched(2, 3000, true, 0))
  t.equal((none as unknown as { everyMs: number }).everyMs, 300, 'no timeoutMs: the idle limit alone')
})

t.test('a quick sweep lasts only while an exchange that needs it is watched', async (t) => {
  const watch = new SilenceWatch()
  t.teardown(() => { watch.stop() })
  const everyMs = (): number => (watch as unknown as { everyMs: number }).everyMs
  const slow = new Watched(1, 60_000, true, 15_000)
  const quick = new Watched(2, 60_000, true, 100)
  watch.watch(slow)
  watch.watch(quick)
  t.equal(everyMs(), 10, 'timeoutMs 100: a pass every 10 ms')
  watch.tick(performance.now())
  t.equal(everyMs(), 10, 'still, while it is watched')
  watch.unwatch(quick)
  watch.tick(performance.now())
  t.equal(everyMs(), 1000, 'once it ends, back to what the others need (a tenth of 15 s, at most 1 s)')
})
