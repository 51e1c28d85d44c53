/**
 * Run Prometheus' `promtool` (Debian package `prometheus`; `.ci/run` installs it when missing).
 * A missing promtool is a failure with the install command, never a skip.
 */
import { spawn } from 'node:child_process'

export interface PromtoolResult {
  code: number | null
  /** stdout and stderr together: promtool prints its findings on either. */
  output: string
}

export const PROMTOOL_MISSING = 'promtool not found: install it with `apt-get install -y prometheus` (.ci/run does)'

/** `promtool ARGS`, with `input` on stdin; resolves with the exit code and all output. */
export async function promtool (args: string[], options: { cwd?: string, input?: string } = {}): Promise<PromtoolResult> {
  return await new Promise((resolve, reject) => {
    const child = spawn('promtool', args, { cwd: options.cwd, stdio: ['pipe', 'pipe', 'pipe'] })
    let output = ''
    child.stdout.on('data', (c: Buffer) => { output += c.toString('utf8') })
    child.stderr.on('data', (c: Buffer) => { output += c.toString('utf8') })
    child.on('error', (err: NodeJS.ErrnoException) => { reject(err.code === 'ENOENT' ? new Error(PROMTOOL_MISSING) : err) })
    child.on('close', (code) => { resolve({ code, output }) })
    child.stdin.on('error', () => {}) // promtool may exit before reading all of stdin
    child.stdin.end(options.input ?? '')
  })
}

/** The breakwater_* metric families a PromQL expression reads (recorded names like `a:breakwater_x:b` excluded). */
export function breakwaterMetrics (expr: string): string[] {
  return [...expr.matchAll(/(?<![\w:])breakwater_[a-z_]+/g)].map((m) => m[0].replace(/_(bucket|sum|count)$/, ''))
}
