/**
 * Run the real `breakwater` binary (dist/cli.js) as a child process, with its stdout parsed as
 * JSON log lines. Killed in the test's teardown.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, writeFileSync, rmSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import type { Test } from 'tap'
import { stringify } from 'yaml'

export const CLI = resolve(import.meta.dirname ?? new URL('.', import.meta.url).pathname, '../../dist/cli.js')

export interface Running {
  child: ChildProcess
  lines: Array<Record<string, unknown>>
  stderr: () => string
  proxy: string
  ops: string
  dir: string
  configPath: string
  /** Resolves with the exit code. */
  exited: Promise<number | null>
  waitForLine: (match: (line: Record<string, unknown>) => boolean, timeoutMs?: number) => Promise<Record<string, unknown>>
}

export function tempDir (t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-proc-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

/** Write `config` as YAML into a temp dir and start the binary on it; resolves once it listens. */
export async function startProcess (t: Test, config: Record<string, unknown>, env: NodeJS.ProcessEnv = {}): Promise<Running> {
  const dir = tempDir(t)
  const configPath = join(dir, 'breakwater.yaml')
  writeFileSync(configPath, stringify({
    service: 'proc', version: '1.0.0', stateDir: join(dir, 'state'),
    listen: { proxy: { host: '127.0.0.1', port: 0 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } },
    ...config
  }))
  return await spawnCli(t, ['start', '--config', configPath], dir, configPath, env)
}

export async function spawnCli (t: Test, args: string[], dir: string, configPath: string, env: NodeJS.ProcessEnv = {}): Promise<Running> {
  const child = spawn(process.execPath, [CLI, ...args], { cwd: dir, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
  const lines: Array<Record<string, unknown>> = []
  let stderr = ''
  let buffered = ''
  const waiters: Array<{ match: (l: Record<string, unknown>) => boolean, resolve: (l: Record<string, unknown>) => void }> = []
  child.stdout?.on('data', (c: Buffer) => {
    buffered += c.toString('utf8')
    let nl
    while ((nl = buffered.indexOf('\n')) !== -1) {
      const text = buffered.slice(0, nl)
      buffered = buffered.slice(nl + 1)
      if (text === '') continue
      const line = JSON.parse(text) as Record<string, unknown>
      lines.push(line)
      for (const w of [...waiters]) if (w.match(line)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(line) }
    }
  })
  child.stderr?.on('data', (c: Buffer) => { stderr += c.toString('utf8') })
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL')
      await exited
    }
  })
  const waitForLine = async (match: (l: Record<string, unknown>) => boolean, timeoutMs = 10_000): Promise<Record<string, unknown>> => {
    const found = lines.find(match)
    if (found !== undefined) return found
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no matching log line within ${timeoutMs} ms; stderr: ${stderr}; lines: ${JSON.stringify(lines.slice(-5))}`)), timeoutMs)
      waiters.push({ match, resolve: (l) => { clearTimeout(timer); resolve(l) } })
      void exited.then(() => { clearTimeout(timer); reject(new Error(`process exited before the line appeared; stderr: ${stderr}`)) })
    })
  }
  const running: Running = { child, lines, stderr: () => stderr, proxy: '', ops: '', dir, configPath, exited, waitForLine }
  if (args[0] === 'start') {
    const listening = await waitForLine((l) => l.msg === 'listening')
    running.proxy = String(listening.proxy).replace('0.0.0.0', '127.0.0.1')
    running.ops = String(listening.ops)
  }
  return running
}

/** RSS of a process in bytes, from /proc. */
export function rssBytes (pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8')
  const m = /VmRSS:\s+(\d+) kB/.exec(status)
  return m === null ? 0 : Number(m[1]) * 1024
}

export interface CliResult {
  /** Exit code, or null when killed by a signal. */
  code: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
  durationMs: number
}

/**
 * Run `breakwater ARGS` to completion and collect its output as text. For commands that exit on
 * their own (`validate`, `--help`, a `start` that fails); killed after `timeoutMs`.
 */
export async function runCli (args: string[], options: { cwd?: string, env?: NodeJS.ProcessEnv, timeoutMs?: number } = {}): Promise<CliResult> {
  const startedAt = Date.now()
  const env = { ...process.env, ...options.env }
  for (const [key, value] of Object.entries(env)) if (value === undefined) delete env[key]
  const child = spawn(process.execPath, [CLI, ...args], { cwd: options.cwd, env, stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (c: Buffer) => { stdout += c.toString('utf8') })
  child.stderr.on('data', (c: Buffer) => { stderr += c.toString('utf8') })
  const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 15_000)
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.on('close', (c, s) => resolve([c, s])))
  clearTimeout(timer)
  return { code, signal, stdout, stderr, durationMs: Date.now() - startedAt }
}
