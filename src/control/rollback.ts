/**
 * Rollback actions (SPEC §7, §13, §14): a webhook POST or an `exec` argv. Rolling back is
 * the second-lowest-risk move, and the one that can go most wrong when repeated, so:
 * - the webhook carries an `Idempotency-Key` derived only from service, version and trigger
 *   name (no instance id, no clock): fifty sidecars that fire together cause one rollback at a
 *   receiver that honours the key; it is retried with backoff on network errors, 429 and 5xx;
 * - `exec` gets BREAKWATER_SERVICE, BREAKWATER_VERSION, BREAKWATER_TRIGGER in its
 *   environment and is stopped, with every process it started, after `timeoutMs`
 *   (process-group.ts);
 * - `git` reverts the release commit and pushes (git-rollback.ts); the same key names the
 *   incident in the commit's trailer, so a fleet makes one revert;
 * - callers enforce the cooldown, "never the same version twice" and "one at a time"
 *   (rollback-policy.ts), and run it in the background.
 */
import { createHash } from 'node:crypto'
import { request } from '../undici.js'
import { join } from 'node:path'
import type { RollbackConfig } from '../config/types.js'
import { runGitRollback } from './git-rollback.js'
import { runCommand } from './process-group.js'

export interface RollbackRequest {
  service: string
  version: string
  /** Trigger name, or null for an operator's rollback. */
  trigger: string | null
  reason: string
}

export interface RollbackResult {
  ok: boolean
  type: RollbackConfig['type']
  /** git: the revert commit on the branch, the commit it reverts, and whether another sidecar had already pushed it. */
  commit?: string
  reverted?: string
  alreadyReverted?: boolean
  idempotencyKey: string
  attempts: number
  status?: number
  exitCode?: number | null
  error?: string
  output?: string
}

/** The same for every retry and every sidecar of the fleet. */
export function idempotencyKey (r: Pick<RollbackRequest, 'service' | 'version' | 'trigger'>): string {
  return createHash('sha256').update(`breakwater-rollback\u0000${r.service}\u0000${r.version}\u0000${r.trigger ?? 'operator'}`).digest('hex').slice(0, 32)
}

/**
 * What the audit line of a rollback's result keeps beside its status: the idempotency key and,
 * for git, the revert commit (and the commit it reverts, when this sidecar made it). The
 * post-mortem draft's timeline reads them from there.
 */
export function auditedOutcome (r: RollbackResult): { idempotencyKey: string, commit?: string, reverted?: string, alreadyReverted?: boolean } {
  const out: ReturnType<typeof auditedOutcome> = { idempotencyKey: r.idempotencyKey }
  if (r.commit !== undefined) out.commit = r.commit
  if (r.reverted !== undefined) out.reverted = r.reverted
  if (r.alreadyReverted !== undefined) out.alreadyReverted = r.alreadyReverted
  return out
}

/** `signal` ends the action early (the sidecar is stopping): the request or the command is cut. */
export interface RollbackOptions {
  signal?: AbortSignal
  /** Where a `git` rollback keeps its working clone (`STATEDIR/rollback-git`). */
  stateDir?: string
}

export async function runRollback (config: RollbackConfig, r: RollbackRequest, options: RollbackOptions = {}): Promise<RollbackResult> {
  const key = idempotencyKey(r)
  const signal = options.signal
  if (config.type === 'exec') return await runExec(config.command, config.timeoutMs, r, key, signal)
  if (config.type === 'git') {
    const git = await runGitRollback(config, { ...r, incident: key }, join(options.stateDir ?? '.', 'rollback-git'), signal)
    return { ok: git.ok, type: 'git', idempotencyKey: key, attempts: git.attempts, commit: git.commit, reverted: git.reverted, alreadyReverted: git.alreadyReverted, error: git.error, output: git.reverted === undefined ? undefined : `reverted ${git.reverted}` }
  }
  const body = JSON.stringify({ service: r.service, version: r.version, trigger: r.trigger, reason: r.reason })
  let last: RollbackResult = { ok: false, type: 'webhook', idempotencyKey: key, attempts: 0 }
  for (let attempt = 1; attempt <= config.retries + 1; attempt++) {
    if (attempt > 1) await delay(Math.min(8000, 250 * 2 ** (attempt - 2)) * (0.75 + Math.random() * 0.5), signal)
    if (aborted(signal)) return { ...last, error: abortReason(signal) }
    try {
      const res = await request(config.url, {
        method: 'POST',
        headers: { ...config.headers, 'content-type': 'application/json', 'idempotency-key': key, 'user-agent': 'breakwater-rollback' },
        body,
        headersTimeout: config.timeoutMs,
        bodyTimeout: config.timeoutMs,
        signal
      })
      const text = (await res.body.text()).slice(0, 2000)
      last = { ok: res.statusCode >= 200 && res.statusCode < 300, type: 'webhook', idempotencyKey: key, attempts: attempt, status: res.statusCode, output: text }
      if (last.ok) return last
      // 4xx (but 408/429) means the receiver refused this request: retrying will not help.
      if (res.statusCode < 500 && res.statusCode !== 408 && res.statusCode !== 429) return last
    } catch (err) {
      last = { ok: false, type: 'webhook', idempotencyKey: key, attempts: attempt, error: aborted(signal) ? abortReason(signal) : (err as { code?: string }).code ?? (err as Error).message }
      if (aborted(signal)) return last
    }
  }
  return last
}

async function runExec (command: readonly string[], timeoutMs: number, r: RollbackRequest, key: string, signal?: AbortSignal): Promise<RollbackResult> {
  const ran = await runCommand(command, {
    env: { ...process.env, BREAKWATER_SERVICE: r.service, BREAKWATER_VERSION: r.version, BREAKWATER_TRIGGER: r.trigger ?? '', BREAKWATER_REASON: r.reason, BREAKWATER_IDEMPOTENCY_KEY: key },
    timeoutMs,
    signal,
    maxOutput: 4000
  })
  const result: RollbackResult = { ok: ran.code === 0 && ran.cut === null, type: 'exec', idempotencyKey: key, attempts: 1, exitCode: ran.code }
  if (ran.error !== undefined) return { ...result, error: ran.error }
  result.output = ran.output
  if (ran.cut === 'timeout') result.error = `timed out after ${timeoutMs} ms: its process group was stopped${ran.killSignal !== null ? ` (${ran.killSignal})` : ''}`
  else if (ran.cut === 'aborted') result.error = abortReason(signal)
  else if (ran.killSignal !== null) result.error = `killed by ${ran.killSignal}`
  return result
}

async function delay (ms: number, signal?: AbortSignal): Promise<void> {
  if (aborted(signal)) return
  await new Promise<void>((resolve) => {
    const timer = setTimeout(done, ms)
    function done (): void { clearTimeout(timer); signal?.removeEventListener('abort', done); resolve() }
    signal?.addEventListener('abort', done, { once: true })
  })
}

/** A function, not an inline test: TypeScript would keep an earlier narrowing across awaits. */
function aborted (signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true
}

function abortReason (signal: AbortSignal | undefined): string {
  const reason: unknown = signal?.reason
  return `cut short: ${reason instanceof Error ? reason.message : String(reason)}`
}
