/**
 * The outage drill (`breakwater drill`, `npm run drill`), end to end as a user runs it: the
 * real binary, a demo app and a sidecar on loopback, steady load, a bad release, the trigger,
 * the rollback, the verification — exit 0 once restored, well under a minute.
 */
import t from 'tap'
import { spawn } from 'node:child_process'
import { readdirSync } from 'node:fs'
import { CLI, childEnv, runCli, tempDir } from './helpers/process.js'
import { STACK_FRAME } from './helpers/operator.js'

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

t.test('breakwater drill --json: the drill\'s result as one JSON document, and nothing else', async (t) => {
  const r = await runCli(['drill', '--json'], { timeoutMs: 90_000 })
  t.equal(r.code, 0, `exit 0; stderr: ${r.stderr}`)
  t.equal(r.stderr, '')
  let result: any
  t.doesNotThrow(() => { result = JSON.parse(r.stdout) }, 'stdout is only JSON', { stdout: r.stdout.slice(0, 500) })
  t.equal(result?.restored, true)
  t.equal(result?.rollbackReceived, true)
  for (const key of ['timeToDetectSeconds', 'timeToMitigateSeconds', 'timeToRestoreSeconds']) t.type(result?.[key], 'number', key)
  t.ok(result?.timeToDetectSeconds <= result?.timeToMitigateSeconds && result?.timeToMitigateSeconds <= result?.timeToRestoreSeconds, 'detected ≤ mitigated ≤ restored')
  t.equal(result?.escalatedSeconds, null)
  const events = ((result?.events ?? []) as Array<{ event: string, phase: string | null, action: string | null }>).map((e) => `${e.event}${e.phase !== null ? `:${e.phase}` : ''}${e.action !== null ? ` ${e.action}` : ''}`)
  const positions = ['trigger_fired rollback', 'incident:detected', 'mitigation rollback', 'incident:restored'].map((e) => events.indexOf(e))
  t.ok(positions.every((p) => p !== -1), `events ${JSON.stringify(events)}`)
  t.match(result?.report, { incident: /^i-/, service: 'shop', status: 'restored' }, 'the post-mortem draft, as GET /v1/incidents/:id/report?format=json')
})

t.test('breakwater drill takes no other word: exit 2 at once, no drill', async (t) => {
  const [extra, fleetExtra] = await Promise.all([runCli(['drill', 'extra']), runCli(['drill', '--fleet', '3', 'more'])])
  for (const r of [extra, fleetExtra]) {
    t.equal(r.code, 2, r.stderr)
    t.match(r.stderr, /unexpected "(extra|more)"; usage: breakwater drill/)
    t.equal(r.stdout, '', 'no drill ran')
  }
})

t.test('a reader that goes away (`breakwater drill | head -1`): the drill stops quietly, exit 141, nothing left behind', async (t) => {
  // The drill's state dir is made under TMPDIR: one of the test's own shows what is left.
  const tmp = tempDir(t)
  const child = spawn(process.execPath, [CLI, 'drill'], { env: childEnv({ TMPDIR: tmp }), stdio: ['ignore', 'pipe', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (c: Buffer) => { stderr += c.toString('utf8') })
  let first = ''
  child.stdout.on('data', (c: Buffer) => {
    first += c.toString('utf8')
    // What `head -1` does once it has its line: close the pipe.
    if (first.includes('\n')) child.stdout.destroy()
  })
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.on('close', (c, s) => resolve([c, s])))
  t.match(first, /^Breakwater drill: /)
  t.equal(signal, null)
  t.equal(code, 141, 'the status of a command ended by SIGPIPE')
  t.equal(stderr, '', 'no stack trace, nothing at all on stderr')
  t.same(readdirSync(tmp), [], 'the drill closed what it started and removed its state dir')
})

for (const [name, code] of [['SIGINT', 130], ['SIGTERM', 143]] as const) {
  t.test(`a drill interrupted half-way (${name === 'SIGINT' ? 'Ctrl-C' : name}): it closes what it started, removes its state dir, exits ${code}`, async (t) => {
    const tmp = tempDir(t)
    const child = spawn(process.execPath, [CLI, 'drill'], { env: childEnv({ TMPDIR: tmp }), stdio: ['ignore', 'pipe', 'pipe'] })
    let stderr = ''
    child.stderr.on('data', (c: Buffer) => { stderr += c.toString('utf8') })
    let stdout = ''
    let sent = false
    child.stdout.on('data', (c: Buffer) => {
      stdout += c.toString('utf8')
      // Half-way: the sidecar runs and the load is on once the first second is printed.
      if (!sent && /\n\+\d+\.\ds /.test(stdout)) { sent = true; child.kill(name) }
    })
    const [exit, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.on('close', (c, s) => resolve([c, s])))
    t.ok(sent, `the drill was running when the signal came (${stdout.slice(0, 200)})`)
    t.equal(signal, null, 'it ended by itself, not by the signal')
    t.equal(exit, code, 'the status of a command ended by that signal')
    t.notMatch(stderr, STACK_FRAME)
    t.match(stderr, /closing what the drill started/)
    t.same(readdirSync(tmp), [], 'its state dir is removed')
  })
}
