/**
 * The operator commands (SPEC §1, §17): status, kill, restore, circuit, failover, mitigate, lift, audit,
 * triage, incident report — each one call to the admin API of one or more sidecars. Human-readable output by
 * default; `--json` prints only JSON. Exit 0 when every sidecar accepted, 1 when one refused
 * or could not be reached, 2 for a usage error.
 */
import { resolveTargets, call, ANSWER_TIMEOUT_MS, FLEET_ANSWER_TIMEOUT_MS, type Answer, type Target } from './admin-client.js'
import { table } from './table.js'

export interface OperatorArgs {
  command: string
  positionals: string[]
  reason?: string
  ttl?: string
  limit?: string
  /** failover --to; mitigate rateLimit --route (repeatable), --rps, --burst. */
  to?: string
  route?: string[]
  rps?: string
  burst?: string
  json: boolean
  admin: string[]
  tokenFile?: string
  /** kill, restore, circuit, failover: write the override for every sidecar of the service (etcd). */
  fleet?: boolean
  /** --timeout: how long to wait for each sidecar's answer (a duration); default 5 s, 10 s with --fleet. */
  timeout?: string
  configPath: string | null
  env: NodeJS.ProcessEnv
}

export interface Io {
  out: (text: string) => void
  err: (text: string) => void
}

export class UsageError extends Error {}

const MUTATING = new Set(['kill', 'restore', 'circuit', 'failover', 'mitigate', 'lift'])
const MITIGATE_USAGE = 'mitigate killSwitch [FLAG...] | circuitBreak [UPSTREAM...] | rollback --reason TEXT, or mitigate rateLimit --route R --rps N [--burst B] --reason TEXT [--ttl 10m]'
const FLEET = new Set(['kill', 'restore', 'circuit', 'failover'])

export async function runOperator (a: OperatorArgs, io: Io): Promise<number> {
  if (MUTATING.has(a.command) && (a.reason === undefined || a.reason.trim() === '')) {
    throw new UsageError(`${a.command} needs --reason "why" (it goes into the audit log)`)
  }
  if (a.fleet === true && !FLEET.has(a.command)) throw new UsageError(`--fleet applies to ${[...FLEET].join(', ')}, not ${a.command}`)
  const timeoutMs = answerTimeout(a)
  const resolved = await resolveTargets({ admin: a.admin, tokenFile: a.tokenFile, configPath: a.configPath, env: a.env })
  const { notes } = resolved
  // A fleet override is one key in etcd: written once, through the first sidecar named.
  const targets = a.fleet === true ? resolved.targets.slice(0, 1) : resolved.targets
  const request = plan(a)
  const answers = (await Promise.all(targets.map(async (t: Target) => await call(t, request.method, request.path, request.body, timeoutMs))))
    .map((x) => x.ok && !fromAdminApi(a, x) ? { ...x, ok: false, foreign: true } : x)
  if (a.json) {
    const json = (x: Answer): unknown => jsonOf(x, request.method !== 'GET')
    io.out(JSON.stringify(answers.length === 1 ? json(answers[0] as Answer) : answers.map(json), null, 2) + '\n')
  } else {
    for (const note of notes) io.err(`note: ${note}\n`)
    for (const answer of answers) {
      if (answers.length > 1) io.out(`== ${answer.admin}\n`)
      if (answer.timedOut === true) {
        // A change asked for may still land after the wait: say so, and how to know.
        const landed = request.method === 'GET' ? '' : `; the ${a.command} may still have been applied: \`breakwater status\` shows it, and the same command again is safe`
        io.err(`error: the admin API at ${answer.admin} gave ${answer.unreachable}: is the sidecar hung or starved? (its ops port's /live says whether it is alive; --timeout waits longer)${landed}\n`)
      } else if (answer.unreachable !== undefined) {
        io.err(`error: cannot reach the admin API at ${answer.admin} (${answer.unreachable}); is the sidecar running, and is --admin right?\n`)
      } else if (answer.foreign === true) {
        io.err(`error: ${foreignMessage(answer)}\n`)
      } else if (!answer.ok) {
        const b = answer.body as { error?: string, message?: string, problems?: string[] } | null
        io.err(`error: ${answer.admin} refused (${answer.status} ${b?.error ?? ''}): ${b?.message ?? JSON.stringify(b)}\n`)
        for (const p of b?.problems ?? []) io.err(`  ${p}\n`)
      } else {
        io.out(render(a, answer.body))
      }
    }
  }
  return answers.every((x) => x.ok) ? 0 : 1
}

/** `--timeout` in milliseconds, or the default for the command. */
function answerTimeout (a: OperatorArgs): number {
  if (a.timeout === undefined) return a.fleet === true ? FLEET_ANSWER_TIMEOUT_MS : ANSWER_TIMEOUT_MS
  // Written as the config's durations are; parsed here so that a command loads no schema code.
  const m = /^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?$/.exec(a.timeout)
  const ms = m === null ? NaN : Math.round(Number(m[1]) * ({ ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] ?? 'ms'] as number))
  // 2^31 − 1 ms: the longest delay a Node.js timer takes (a longer one fires at once).
  if (!(ms >= 1 && ms <= 2 ** 31 - 1)) throw new UsageError(`--timeout must be a duration from 1 ms, such as 5s or 30s (got "${a.timeout}")`)
  return ms
}

/**
 * Whether a 2xx answer is the admin API's answer to this command. `--admin` aimed at the proxy
 * port reaches the app, which may well answer 200 with a page of its own: printed as a status it
 * would read as an empty sidecar, and as a triage it cannot be read at all.
 */
function fromAdminApi (a: OperatorArgs, x: Answer): boolean {
  const b = x.body
  if (a.command === 'incident' && !a.json) return x.contentType === 'text/markdown' && typeof b === 'string'
  if (typeof b !== 'object' || b === null || Array.isArray(b)) return false
  switch (a.command) {
    case 'status': return typeof b.service === 'string'
    case 'triage': return typeof b.scenario === 'string' && typeof b.recommendation === 'object' && b.recommendation !== null && typeof b.evidence === 'object' && b.evidence !== null
    case 'audit': return Array.isArray(b.entries)
    case 'kill': case 'restore': return typeof b.flag === 'string'
    case 'circuit': return typeof b.upstream === 'string'
    case 'failover': case 'mitigate': case 'lift': return typeof b.id === 'string' && Array.isArray(b.targets)
    case 'incident': return typeof b.incident === 'string'
    default: return true
  }
}

function foreignMessage (x: Answer): string {
  return `${x.admin} answered ${x.status} (${x.contentType === '' ? 'no content-type' : x.contentType}), but not as a Breakwater admin API; is --admin the sidecar's admin listener (listen.admin), not its proxy or ops port?`
}

/**
 * The answer as `--json` prints it. A wait that ran out (`timedOut`) is told apart from a sidecar
 * that refused the connection: after a timeout a change asked for may still land
 * (`mayHaveApplied`), after a refused connection it cannot have.
 */
function jsonOf (a: Answer, change: boolean): unknown {
  if (a.unreachable !== undefined) {
    return { admin: a.admin, error: 'unreachable', message: a.unreachable, ...(a.timedOut === true ? { timedOut: true, mayHaveApplied: change } : {}) }
  }
  if (a.foreign === true) return { admin: a.admin, status: a.status, error: 'not_admin_api', message: foreignMessage(a) }
  return a.ok ? a.body : { admin: a.admin, status: a.status, ...(typeof a.body === 'object' && a.body !== null ? a.body : { body: a.body }) }
}

interface Planned { method: 'GET' | 'PUT' | 'POST' | 'DELETE', path: string, body?: unknown }

/** The command's words after its name: at least `n`, at most `max` (a stray word is refused, never ignored). */
function need (a: OperatorArgs, n: number, usage: string, max = n): string[] {
  if (a.positionals.length < n) throw new UsageError(`usage: breakwater ${usage}`)
  if (a.positionals.length > max) throw new UsageError(`unexpected "${a.positionals.slice(max).join(' ')}"; usage: breakwater ${usage}`)
  return a.positionals
}

function plan (a: OperatorArgs): Planned {
  const scoped = (b: Record<string, unknown>): Record<string, unknown> => (a.fleet === true ? { ...b, scope: 'fleet' } : b)
  const withTtl = (b: Record<string, unknown>): Record<string, unknown> => scoped(a.ttl !== undefined ? { ...b, ttl: a.ttl } : b)
  switch (a.command) {
    case 'status':
      need(a, 0, 'status [--json]')
      return { method: 'GET', path: '/v1/state' }
    case 'triage':
      need(a, 0, 'triage [--json]')
      return { method: 'GET', path: '/v1/triage' }
    case 'audit':
      need(a, 0, 'audit [--limit N] [--json]')
      return { method: 'GET', path: `/v1/audit?limit=${encodeURIComponent(a.limit ?? '20')}` }
    case 'kill': {
      const [flag] = need(a, 1, 'kill FLAG --reason TEXT [--ttl 30m]')
      return { method: 'PUT', path: `/v1/flags/${encodeURIComponent(flag as string)}`, body: withTtl({ enabled: false, reason: a.reason }) }
    }
    case 'restore': {
      const [flag] = need(a, 1, 'restore FLAG --reason TEXT')
      return { method: 'DELETE', path: `/v1/flags/${encodeURIComponent(flag as string)}`, body: scoped({ reason: a.reason }) }
    }
    case 'circuit': {
      const [upstream, state] = need(a, 2, 'circuit UPSTREAM open|closed|auto --reason TEXT [--ttl 30m]')
      if (state !== 'open' && state !== 'closed' && state !== 'auto') throw new UsageError('usage: breakwater circuit UPSTREAM open|closed|auto --reason TEXT')
      return { method: 'PUT', path: `/v1/circuits/${encodeURIComponent(upstream as string)}`, body: withTtl({ state, reason: a.reason }) }
    }
    case 'failover': {
      const [upstream] = need(a, 1, 'failover UPSTREAM [--to OTHER] --reason TEXT [--ttl 30m] [--fleet]')
      return { method: 'POST', path: '/v1/mitigations', body: withTtl({ action: 'failover', upstreams: [upstream], ...(a.to !== undefined ? { to: a.to } : {}), reason: a.reason }) }
    }
    case 'mitigate': {
      const [action, ...targets] = need(a, 1, MITIGATE_USAGE, Infinity)
      if (action === 'rateLimit') return { method: 'POST', path: '/v1/mitigations', body: withTtl(rateLimitBody(a, targets)) }
      if (action !== 'killSwitch' && action !== 'circuitBreak' && action !== 'rollback') throw new UsageError(`usage: breakwater ${MITIGATE_USAGE}`)
      const body: Record<string, unknown> = { action, reason: a.reason }
      if (action === 'killSwitch' && targets.length > 0) body.flags = targets
      if (action === 'circuitBreak' && targets.length > 0) body.upstreams = targets
      // A version here would read as "roll back to it", which no rollback action can promise.
      if (action === 'rollback' && targets.length > 0) throw new UsageError(`mitigate rollback takes no target (got "${targets.join(' ')}"): it rolls back the version this sidecar runs, as the config's rollback action does`)
      return { method: 'POST', path: '/v1/mitigations', body }
    }
    case 'incident': {
      const [sub, id] = need(a, 2, 'incident report INCIDENT_ID [--json]')
      if (sub !== 'report') throw new UsageError('usage: breakwater incident report INCIDENT_ID [--json]')
      // The sidecar renders the Markdown; --json asks it for the same draft as JSON.
      return { method: 'GET', path: `/v1/incidents/${encodeURIComponent(id as string)}/report${a.json ? '?format=json' : ''}` }
    }
    case 'lift': {
      const [id] = need(a, 1, 'lift MITIGATION_ID --reason TEXT')
      return { method: 'DELETE', path: `/v1/mitigations/${encodeURIComponent(id as string)}`, body: { reason: a.reason } }
    }
    default:
      throw new UsageError(`unknown command "${a.command}"`)
  }
}

/** `mitigate rateLimit --route R --rps N [--burst B]`: numbers as numbers; the sidecar checks the rest. */
function rateLimitBody (a: OperatorArgs, extra: string[]): Record<string, unknown> {
  const routes = [...(a.route ?? []), ...extra]
  if (routes.length === 0 || a.rps === undefined) throw new UsageError(`usage: breakwater ${MITIGATE_USAGE}`)
  const number = (flag: string, v: string): number => {
    if (v.trim() === '' || !Number.isFinite(Number(v))) throw new UsageError(`${flag} must be a number (got "${v}")`)
    return Number(v)
  }
  return { action: 'rateLimit', routes, requestsPerSecond: number('--rps', a.rps), ...(a.burst !== undefined ? { burst: number('--burst', a.burst) } : {}), reason: a.reason }
}

function render (a: OperatorArgs, body: any): string {
  switch (a.command) {
    case 'status': return renderStatus(body)
    case 'kill': return `flag ${body.flag} forced OFF${body.scope === 'fleet' ? ' on every sidecar of the service (fleet)' : ''}${body.expiresAt !== null && body.expiresAt !== undefined ? ` until ${body.expiresAt}` : ''}${persistNote(body)}\n`
    case 'restore': return renderRestore(body)
    case 'circuit': return `circuit ${body.upstream}: ${body.forced === null ? 'automatic' : `forced ${String(body.forced)}`}${body.scope === 'fleet' ? ' (fleet: every sidecar of the service)' : ''}, now ${String(body.state)}${persistNote(body)}\n`
    case 'failover':
    case 'mitigate':
    case 'lift': {
      const verb: Record<string, string> = { active: 'applied', lifted: 'lifted', running: 'started (running in the background)', succeeded: 'succeeded', failed: 'FAILED' }
      const what = body.to !== undefined ? ` → ${String(body.to)}` : body.limit !== undefined ? ` at ${String(body.limit.requestsPerSecond)} req/s (burst ${String(body.limit.burst)})` : ''
      const until = body.status === 'active' && typeof body.expiresAt === 'string' ? `, until ${body.expiresAt}` : ''
      const fleet = body.scope === 'fleet' ? ' (fleet: every sidecar of the service)' : ''
      const lines = [`mitigation ${body.id}: ${body.action} ${verb[body.status] ?? String(body.status)} — ${(body.targets as string[]).join(', ')}${what}${fleet}${until}`]
      if (body.result !== null && body.result !== undefined) lines.push(`rollback: ${body.result.ok === true ? 'ok' : 'FAILED'} (${body.result.type}, ${body.result.status ?? `exit ${String(body.result.exitCode)}`}, attempts ${body.result.attempts})`)
      if (body.status === 'running') lines.push('follow it with: breakwater status')
      if (a.command !== 'lift' && body.status === 'active') lines.push(`lift it with: breakwater lift ${body.id} --reason "..."`)
      return lines.join('\n') + persistNote(body) + '\n'
    }
    case 'triage': return renderTriage(body)
    case 'incident': return typeof body === 'string' ? body : JSON.stringify(body, null, 2) + '\n'
    case 'audit':
      return table(['time', 'action', 'targets', 'result', 'requester', 'reason'], (body.entries as any[]).map((e) => [e.time, e.action, (e.targets ?? []).join(','), e.result, e.requester, e.reason])) + '\n'
    default:
      return JSON.stringify(body, null, 2) + '\n'
  }
}

/**
 * A restore says what is in force after it, not only what it dropped: the other door's
 * decision (the fleet's kill after a local restore, this sidecar's own newer kill after a fleet
 * restore) may still keep the feature off, and the operator is told which and how to lift it.
 */
function renderRestore (body: any): string {
  const fleet = body.scope === 'fleet'
  const now = body.enabled === true ? 'ON' : 'OFF'
  const dropped = `flag ${String(body.flag)}: ${fleet ? 'fleet' : 'local'} override dropped`
  if (!fleet && body.origin === 'fleet') {
    const f = body.fleetOverride ?? {}
    const decision = `the fleet's override (${body.enabled === true ? 'on' : 'kill switch'}, reason "${String(f.reason)}", by ${String(f.requester)} through ${String(f.instance)}, since ${String(f.at)}${typeof f.expiresAt === 'string' ? `, until ${f.expiresAt}` : ''})`
    if (body.enabled === true) return `${dropped}, now ON by ${decision}${persistNote(body)}\n`
    return `${dropped}, but the feature is still OFF: ${decision} is in force on every sidecar of the service\n` +
      `lift it with: breakwater restore ${String(body.flag)} --fleet --reason "..."${persistNote(body)}\n`
  }
  if (fleet && body.origin === 'local' && body.enabled !== true) {
    return `${dropped}, but the feature is still OFF on this sidecar: its own kill switch, newer than the fleet's decision, is in force\n` +
      `lift it there with: breakwater restore ${String(body.flag)} --reason "..." (without --fleet)${persistNote(body)}\n`
  }
  return `${dropped}, now ${now}${persistNote(body)}\n`
}

function renderTriage (r: any): string {
  const out: string[] = []
  out.push(`SCENARIO  ${String(r.scenario).replace(/_/g, ' ')}`)
  out.push(`          ${r.summary}`)
  const rec = r.recommendation
  out.push('', `DO        ${rec.action}${rec.target !== null ? ` ${rec.target}` : ''} — ${rec.why}`)
  if (rec.command !== null) out.push(`          $ ${rec.command}`)
  const alt = rec.alternative
  if (alt !== undefined) out.push(`OR        ${alt.action}${alt.target !== null ? ` ${alt.target}` : ''} — ${alt.why}`, `          $ ${alt.command}`)
  const sig = (s: any): string[] => [s.name, String(s.current.ratePerSecond), pctOf(s.current.errorRate), pctOf(s.baseline.errorRate), ms(s.current.p99Ms), ms(s.baseline.p99Ms), s.elevated ? 'YES' : s.slow === true ? 'SLOW' : '']
  const header = ['scope', 'req/s', 'errors', 'baseline', 'p99', 'baseline p99', 'elevated']
  out.push('', 'EVIDENCE (last minute vs the 30 minutes before)')
  out.push(table(header, [sig(r.evidence.all), ...r.evidence.routes.map((x: any) => sig({ ...x, name: `route ${x.name}` })), ...r.evidence.upstreams.map((x: any) => sig({ ...x, name: `upstream ${x.name}` }))]))
  const changes = r.evidence.recentChanges
  out.push('', `CHANGES   version: ${changes.version ?? 'none in 30 min'}; config: ${changes.config ?? 'none in 30 min'}; flags: ${changes.flags.length === 0 ? 'none' : changes.flags.map((f: any) => `${f.flag}=${f.enabled ? 'on' : 'off'}`).join(', ')}`)
  if (r.evidence.circuits.length > 0) out.push(`CIRCUITS  ${r.evidence.circuits.map((c: any) => `${c.upstream} ${c.state}`).join(', ')}`)
  if (r.ruledOut.length > 0) {
    out.push('', 'RULED OUT')
    for (const x of r.ruledOut) out.push(`  ${String(x.scenario).replace(/_/g, ' ')}: ${x.why}`)
  }
  return out.join('\n') + '\n'
}

function pctOf (x: number | null): string {
  return x === null ? '-' : `${(x * 100).toFixed(1)}%`
}

function ms (x: number | null): string {
  return x === null ? '-' : `${x} ms`
}

function persistNote (body: any): string {
  return body?.persisted === false ? '\nwarning: the sidecar could not persist this (stateDir unwritable); it is in force until restart' : ''
}

function renderStatus (s: any): string {
  const out: string[] = []
  out.push(`${s.service} ${s.version} — health ${s.health?.status ?? '?'}${s.persisted === false ? ' — state NOT persisted' : ''}`)
  // What is wrong without failing readiness: the app refusing connections, etcd unreachable.
  for (const w of (s.health?.warnings ?? []) as any[]) out.push(`warning: ${String(w.message)}`)
  const flags = Object.entries(s.flags ?? {}) as Array<[string, any]>
  out.push('', 'FLAGS')
  out.push(flags.length === 0 ? '  (none)' : table(['flag', 'enabled', 'from', 'kill switch for'], flags.map(([k, f]) => [k, f.enabled ? 'on' : 'OFF', f.origin, (f.killSwitchFor ?? []).join(',') || '-'])))
  const circuits = Object.entries(s.circuits ?? {}) as Array<[string, any]>
  out.push('', 'CIRCUITS')
  out.push(circuits.length === 0 ? '  (none)' : table(['upstream', 'state', 'forced', 'from', 'failure rate', 'window'], circuits.map(([k, c]) => [k, c.state, c.forced ?? '-', c.forced === null ? '-' : String(c.origin ?? 'local'), `${(c.failureRate * 100).toFixed(1)}%`, String(c.windowRequests)])))
  const mitigations = (s.mitigations ?? []) as any[]
  out.push('', 'ACTIVE MITIGATIONS')
  // A failover says where it came from (local or fleet), and when a newer decision overrides it.
  const from = (m: any): string => m.origin === undefined ? '-' : `${String(m.origin)}${m.inForce === false ? ' (overridden)' : ''}`
  out.push(mitigations.length === 0 ? '  (none)' : table(['id', 'action', 'status', 'targets', 'from', 'since', 'source', 'reason'], mitigations.map((m) => [m.id, m.action, m.status, `${m.targets.join(',')}${m.to !== undefined ? ` → ${m.to}` : ''}${m.limit !== undefined ? ` @ ${m.limit.requestsPerSecond}/s` : ''}`, from(m), m.createdAt, m.source, m.reason])))
  const failed = ((s.rollbacks ?? []) as any[]).filter((m) => m.status === 'failed')
  if (failed.length > 0) out.push('', 'FAILED ROLLBACKS', table(['id', 'version', 'at', 'error'], failed.map((m) => [m.id, m.targets.join(','), m.finishedAt ?? m.createdAt, m.error ?? '-'])))
  // Open ones and the most recent (the state holds the newest ten): who opened each, what
  // mitigated it, and whether and how fast service came back.
  const incidents = (s.incidents ?? []) as any[]
  out.push('', 'INCIDENTS')
  out.push(incidents.length === 0 ? '  (none)' : table(['id', 'status', 'by', 'mitigation', 'detected', 'restored', 'time to restore'], incidents.map((i) => [i.id, `${String(i.status)}${i.escalatedAt != null ? ', escalated' : ''}`, i.trigger === null ? 'operator' : `trigger ${String(i.trigger)}`, i.mitigation === null ? '-' : `${String(i.mitigation.action)} (${String(i.mitigation.status)})`, i.detectedAt, i.restoredAt ?? '-', typeof i.timeToRestoreSeconds === 'number' ? `${i.timeToRestoreSeconds.toFixed(1)} s` : '-'])))
  const triggers = (s.triggers ?? []) as any[]
  if (triggers.length > 0) {
    out.push('', 'TRIGGERS')
    out.push(table(['trigger', 'state', 'value', 'threshold', 'requests'], triggers.map((t) => [t.name, t.state, String(t.value ?? '-'), String(t.threshold), String(t.requests)])))
  }
  return out.join('\n') + '\n'
}
