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
import { ROOT } from './root.js'

export const CLI = resolve(ROOT, 'dist/cli.js')

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

/**
 * Write `config` as YAML into a temp dir, over a process's base (service `proc`, a stateDir in
 * that dir, every listener on 127.0.0.1 port 0).
 */
export function writeProcessConfig (t: Test, config: Record<string, unknown>): { dir: string, configPath: string } {
  const dir = tempDir(t)
  const configPath = join(dir, 'breakwater.yaml')
  writeFileSync(configPath, stringify({
    service: 'proc', version: '1.0.0', stateDir: join(dir, 'state'),
    listen: { proxy: { host: '127.0.0.1', port: 0 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } },
    ...config
  }))
  return { dir, configPath }
}

/** Write `config` as YAML into a temp dir and start the binary on it; resolves once it listens. */
export async function startProcess (t: Test, config: Record<string, unknown>, env: NodeJS.ProcessEnv = {}): Promise<Running> {
  const { dir, configPath } = writeProcessConfig(t, config)
  return await spawnCli(t, ['start', '--config', configPath], dir, configPath, env)
}

/**
 * `breakwater ARGS` started as users run it: without tap's hooks (`withoutTapHooks`) unless `env`
 * sets NODE_OPTIONS. `launcher` runs it through a command first (`['sh', '-c', 'ulimit -f 16 && exec "$@"', 'sh']`).
 */
export async function spawnCli (t: Test, args: string[], dir: string, configPath: string, env: NodeJS.ProcessEnv = {}, launcher: string[] = []): Promise<Running> {
  const argv = [...launcher, process.execPath, CLI, ...args]
  const child = spawn(argv[0] as string, argv.slice(1), { cwd: dir, env: childEnv(env), stdio: ['ignore', 'pipe', 'pipe'] })
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
    const listening = await waitForLine((l) => l.msg === 'listening', 60_000)
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

/**
 * Environment overrides that keep tap's per-process hook (its NODE_OPTIONS `--import`) out of
 * a spawned binary: the hook roughly triples a child's start-up time on a busy machine.
 */
export const withoutTapHooks: NodeJS.ProcessEnv = { NODE_OPTIONS: undefined }

/** This process's environment with `overrides`, without tap's hooks: what a spawned binary gets. */
export function childEnv (overrides: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env = { ...process.env, ...withoutTapHooks, ...overrides }
  for (const [key, value] of Object.entries(env)) if (value === undefined) delete env[key]
  return env
}

/**
 * `startProcess` with a start-up deadline of your choosing (a loaded machine can take longer
 * than `spawnCli`'s default to load the binary).
 */
export async function startProcessWithin (t: Test, config: Record<string, unknown>, timeoutMs: number, env: NodeJS.ProcessEnv = {}): Promise<Running> {
  const { dir, configPath } = writeProcessConfig(t, config)
  // Options first, so spawnCli does not wait for `listening` itself; we wait here instead.
  const running = await spawnCli(t, ['--config', configPath, 'start'], dir, configPath, env)
  const listening = await running.waitForLine((l) => l.msg === 'listening', timeoutMs)
  running.proxy = String(listening.proxy).replace('0.0.0.0', '127.0.0.1')
  running.ops = String(listening.ops)
  return running
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
 * their own (`validate`, `--help`, a `start` that fails); killed after `timeoutMs`. Runs
 * without tap's hooks (`withoutTapHooks`).
 */
export async function runCli (args: string[], options: { cwd?: string, env?: NodeJS.ProcessEnv, timeoutMs?: number } = {}): Promise<CliResult> {
  const startedAt = Date.now()
  const child = spawn(process.execPath, [CLI, ...args], { cwd: options.cwd, env: childEnv(options.env), stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (c: Buffer) => { stdout += c.toString('utf8') })
  child.stderr.on('data', (c: Buffer) => { stderr += c.toString('utf8') })
  const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 30_000)
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.on('close', (c, s) => resolve([c, s])))
  clearTimeout(timer)
  return { code, signal, stdout, stderr, durationMs: Date.now() - startedAt }
}

export interface RawRunning {
  child: ChildProcess
  /** Everything read from stdout so far, as text. */
  stdout: () => string
  stderr: () => string
  proxy: string
  ops: string
  configPath: string
  exited: Promise<number | null>
}

/** The Node flags of a command line that runs Breakwater: what comes between `node` and `dist/cli.js` (none without it). */
export function nodeFlagsOf (argv: readonly string[]): string[] {
  const cli = argv.findIndex((a) => a.endsWith('dist/cli.js'))
  return cli < 1 ? [] : argv.slice(1, cli)
}

/**
 * The Node flags the image starts Breakwater with: the Dockerfile's `CMD` (exec form). A test
 * that measures the process's memory runs it as it ships.
 */
export function imageNodeFlags (): string[] {
  const cmd = readFileSync(join(ROOT, 'Dockerfile'), 'utf8').split('\n').filter((l) => l.startsWith('CMD ')).at(-1)
  if (cmd === undefined) throw new Error('the Dockerfile has no CMD')
  return nodeFlagsOf(JSON.parse(cmd.slice(4)) as string[])
}

/**
 * Like `startProcess`, but stdout is kept as raw text instead of parsed, so a test can check
 * every byte the process wrote. With `stopReadingStdout`, stdout is read only up to the
 * `listening` line and then left unread: the pipe fills and the process's stdout stalls. With
 * `discardStdout`, what follows the `listening` line is read as fast as it comes and thrown away.
 * `nodeFlags` go to Node before the command (`imageNodeFlags()`: as the image runs it).
 */
export async function startProcessRaw (t: Test, config: Record<string, unknown>, options: { stopReadingStdout?: boolean, discardStdout?: boolean, nodeFlags?: string[] } = {}): Promise<RawRunning> {
  const { dir, configPath } = writeProcessConfig(t, config)
  const child = spawn(process.execPath, [...(options.nodeFlags ?? []), CLI, 'start', '--config', configPath], { cwd: dir, env: childEnv(), stdio: ['ignore', 'pipe', 'pipe'] })
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL')
      await exited
    }
  })
  let stdout = ''
  let stderr = ''
  child.stderr?.on('data', (c: Buffer) => { stderr += c.toString('utf8') })
  const stdoutStream = child.stdout as NonNullable<ChildProcess['stdout']>
  const listening = await new Promise<Record<string, unknown>>((resolve, reject) => {
    let found = false
    const onData = (c: Buffer): void => {
      stdout += c.toString('utf8')
      if (found) return
      // Complete lines only: a chunk may end mid-line.
      for (const text of stdout.slice(0, stdout.lastIndexOf('\n') + 1).split('\n')) {
        if (!text.includes('"listening"')) continue
        const line = JSON.parse(text) as Record<string, unknown>
        if (line.msg !== 'listening') continue
        found = true
        if (options.stopReadingStdout === true) {
          stdoutStream.off('data', onData)
          stdoutStream.pause()
        } else if (options.discardStdout === true) {
          stdoutStream.off('data', onData)
          stdoutStream.resume()
        }
        resolve(line)
        return
      }
    }
    stdoutStream.on('data', onData)
    void exited.then(() => { if (!found) reject(new Error(`process exited before listening; stderr: ${stderr}`)) })
  })
  return {
    child,
    stdout: () => stdout,
    stderr: () => stderr,
    proxy: String(listening.proxy),
    ops: String(listening.ops),
    configPath,
    exited
  }
}
