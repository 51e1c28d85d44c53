/**
 * Rollback actions (SPEC §7, §13, §14): a webhook POST or an `exec` argv. Rolling back is
 * the second-lowest-risk move, and the one that can go most wrong when repeated, so:
 * - the webhook carries an `Idempotency-Key` derived only from service, version and trigger
 *   name (no instance id, no clock): fifty sidecars that fire together cause one rollback at a
 *   receiver that honours the key; it is retried with backoff on network errors, 429 and 5xx;
 * - `exec` gets BREAKWATER_SERVICE, BREAKWATER_VERSION, BREAKWATER_TRIGGER in its
 *   environment and is killed after `timeoutMs`;
 * - callers enforce the cooldown and "never the same version twice" (control-plane.ts).
 */
import { createHash } from 'node:crypto'
import { spawn } from 'node:child_process'
import { request } from 'undici'
import type { RollbackConfig } from '../config/types.js'

export interface RollbackRequest {
  service: string
  version: string
  /** Trigger name, or null for an operator's rollback. */
  trigger: string | null
  reason: string
}

export interface RollbackResult {
  ok: boolean
  type: 'webhook' | 'exec'
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

export async function runRollback (config: RollbackConfig, r: RollbackRequest, sleep = delay): Promise<RollbackResult> {
  const key = idempotencyKey(r)
  if (config.type === 'exec') return await runExec(config.command, config.timeoutMs, r, key)
  const body = JSON.stringify({ service: r.service, version: r.version, trigger: r.trigger, reason: r.reason })
  let last: RollbackResult = { ok: false, type: 'webhook', idempotencyKey: key, attempts: 0 }
  for (let attempt = 1; attempt <= config.retries + 1; attempt++) {
    if (attempt > 1) await sleep(Math.min(8000, 250 * 2 ** (attempt - 2)) * (0.75 + Math.random() * 0.5))
    try {
      const res = await request(config.url, {
        method: 'POST',
        headers: { ...config.headers, 'content-type': 'application/json', 'idempotency-key': key, 'user-agent': 'breakwater-rollback' },
        body,
        headersTimeout: config.timeoutMs,
        bodyTimeout: config.timeoutMs
      })
      const text = (await res.body.text()).slice(0, 2000)
      last = { ok: res.statusCode >= 200 && res.statusCode < 300, type: 'webhook', idempotencyKey: key, attempts: attempt, status: res.statusCode, output: text }
      if (last.ok) return last
      // 4xx (but 408/429) means the receiver refused this request: retrying will not help.
      if (res.statusCode < 500 && res.statusCode !== 408 && res.statusCode !== 429) return last
    } catch (err) {
      last = { ok: false, type: 'webhook', idempotencyKey: key, attempts: attempt, error: (err as { code?: string }).code ?? (err as Error).message }
    }
  }
  return last
}

async function runExec (command: readonly string[], timeoutMs: number, r: RollbackRequest, key: string): Promise<RollbackResult> {
  return await new Promise((resolve) => {
    let output = ''
    const child = spawn(command[0] as string, command.slice(1), {
      env: { ...process.env, BREAKWATER_SERVICE: r.service, BREAKWATER_VERSION: r.version, BREAKWATER_TRIGGER: r.trigger ?? '', BREAKWATER_REASON: r.reason, BREAKWATER_IDEMPOTENCY_KEY: key },
      stdio: ['ignore', 'pipe', 'pipe']
    })
    // Our own timer, cleared on exit: spawn's `timeout` option leaves its timer running after
    // the child exits, holding the process open for the whole timeout.
    let killed = false
    const timer = setTimeout(() => { killed = true; child.kill('SIGKILL') }, timeoutMs)
    const keep = (c: Buffer): void => { if (output.length < 4000) output += c.toString('utf8') }
    child.stdout.on('data', keep)
    child.stderr.on('data', keep)
    child.on('error', (err) => { clearTimeout(timer); resolve({ ok: false, type: 'exec', idempotencyKey: key, attempts: 1, exitCode: null, error: err.message }) })
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      resolve({
        ok: code === 0,
        type: 'exec',
        idempotencyKey: key,
        attempts: 1,
        exitCode: code,
        output: output.slice(0, 4000),
        ...(signal !== null ? { error: killed ? `killed by ${signal} after ${timeoutMs} ms` : `killed by ${signal}` } : {})
      })
    })
  })
}

async function delay (ms: number): Promise<void> {
  await new Promise((resolve) => setTimeout(resolve, ms))
}
