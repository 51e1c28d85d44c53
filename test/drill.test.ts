/**
 * The outage drill (`breakwater drill`, `npm run drill`), end to end as a user runs it: the
 * real binary, a demo app and a sidecar on loopback, steady load, a bad release, the trigger,
 * the rollback, the verification — exit 0 once restored, well under a minute.
 */
import t from 'tap'
import { runCli } from './helpers/process.js'

t.setTimeout(120_000)

t.test('breakwater drill: exit 0, the timeline, the timeline in order, the post-mortem draft', async (t) => {
  const r = await runCli(['drill'], { timeoutMs: 90_000 })
  const out = r.stdout
  t.equal(r.signal, null, `not killed (took ${r.durationMs} ms)`)
  t.equal(r.code, 0, `exit 0; stderr: ${r.stderr}`)
  t.comment(`the drill took ${(r.durationMs / 1000).toFixed(1)} s`)
  t.equal(r.stderr, '', 'nothing on stderr')

  // Live progress (not a terminal: one line a second) with the bad release and the trigger.
  t.match(out, /deploying a bad release of \/checkout/)
  t.match(out, /req\/s\s+errors \d+%\s+trigger (fired|rearming)/, 'the progress shows the trigger firing')
  t.match(out, /mitigation rollback/)
  t.notMatch(out, /\x1b\[/, 'no terminal control codes when stdout is not a terminal')

  // The timeline, each step with its time from the bad release.
  t.match(out, /Timeline \(from the bad release\):/)
  const at = (label: string): number | null => {
    const m = new RegExp(`^\\s+${label}\\s+\\+(\\d+\\.\\d) s`, 'm').exec(out)
    return m === null ? null : Number(m[1])
  }
  const onset = at('fault onset')
  const detected = at('detected')
  const mitigated = at('mitigated')
  const restored = at('restored \\(verified\\)')
  t.equal(onset, 0, 'fault onset at +0.0 s')
  t.ok(detected !== null && mitigated !== null && restored !== null, `detected +${String(detected)} s, mitigated +${String(mitigated)} s, restored +${String(restored)} s`)
  if (detected !== null && mitigated !== null && restored !== null) {
    t.ok(detected >= 0 && detected <= mitigated && mitigated <= restored, 'in order: detected ≤ mitigated ≤ restored')
    t.ok(restored > 0, `time to restore ${restored} s (its speed is measured in bench, not here)`)
  }
  t.match(out, /rollback webhook accepted/)
  t.notMatch(out, /NOT received/, 'the demo app received the rollback')
  t.match(out, /trigger error_rate_5pct fired/)

  // The sidecar's own events, in order.
  t.match(out, /Sidecar events:/)
  const events = out.slice(out.indexOf('Sidecar events:')).split('\n').map((l) => l.trim()).filter((l) => /^\d\d:\d\d:\d\d\.\d{3}\s/.test(l)).map((l) => l.split(/\s+/).slice(1).join(' '))
  const order = ['trigger_fired rollback', 'incident:detected', 'mitigation rollback', 'incident:restored']
  const positions = order.map((e) => events.indexOf(e))
  t.ok(positions.every((p) => p !== -1), `events ${JSON.stringify(events)}`)
  t.same([...positions].sort((a, b) => a - b), positions, 'fired, detected, mitigated, restored in that order')
  t.notOk(events.includes('incident:not_restored'))

  // The post-mortem draft of the incident, at the end.
  t.match(out, /Post-mortem draft \(breakwater incident report i-[a-z0-9-]+\):/)
  for (const h of ['## Impact', '## Timeline (UTC)', '## Who or what acted', '## Times', '## What triage ruled out', '## Open questions for the review']) t.match(out, h)
  t.match(out, /Requests failed: \d+ of \d+/)
  t.match(out, /restoration verified \(synthetic checks and real traffic\)/)
  t.ok(out.indexOf('Post-mortem draft') > out.indexOf('Sidecar events:'), 'after the timeline and the events')

  const final = /Service restored (\d+\.\d) s after the bad release/.exec(out)
  t.ok(final !== null, 'the last line says restored')
  t.equal(Number(final?.[1]), restored, 'with the same time to restore')
  t.notMatch(out, /NOT restored/)
})

t.test('breakwater drill --no-restore: the rollback does not fix it, verification fails, the incident is escalated at once; exit 0', async (t) => {
  const r = await runCli(['drill', '--no-restore'], { timeoutMs: 90_000 })
  const out = r.stdout
  t.equal(r.code, 0, `exit 0; stderr: ${r.stderr}`)
  t.equal(r.stderr, '')
  t.match(out, /the rollback will not fix it/)
  t.match(out, /verification failed\s+the rollback did not bring \/checkout back/)
  const escalated = /^\s+escalated\s+\+(\d+\.\d) s\s+sent: ESCALATED: incident i-\S+ the mitigation did not restore service \(verification failed\)/m.exec(out)
  t.ok(escalated !== null, 'the escalation notification, as sent to the webhook')
  const events = out.slice(out.indexOf('Sidecar events:')).split('\n').map((l) => l.trim()).filter((l) => /^\d\d:\d\d:\d\d\.\d{3}\s/.test(l)).map((l) => l.split(/\s+/).slice(1).join(' '))
  const order = ['trigger_fired rollback', 'incident:detected', 'mitigation rollback', 'incident:not_restored', 'incident:escalated']
  const positions = order.map((e) => events.indexOf(e))
  t.ok(positions.every((p) => p !== -1), `events ${JSON.stringify(events)}`)
  t.same([...positions].sort((a, b) => a - b), positions, 'fired, detected, mitigated, not restored, escalated in that order')
  t.notOk(events.includes('incident:restored'))
  t.match(out, /## Times[\s\S]*Escalated at: \d{4}-/, 'the post-mortem draft shows the escalation')
  t.match(out, /Why did the mitigation not restore service/)
  t.match(out, /time to restore and duration: service was not verified restored/, 'and leaves out what it does not hold')
  const final = /Service was NOT restored; the incident was escalated (\d+\.\d) s after the bad release\./.exec(out)
  t.equal(final?.[1], escalated?.[1], 'the last line says escalated, at the same time')
})
