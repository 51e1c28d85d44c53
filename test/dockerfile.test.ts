/**
 * The container image, checked without a Docker engine.
 *
 * 1. The Dockerfile is parsed and its shape asserted: multi-stage, a Node 24
 *    runtime, every base image pinned by digest (with a note on bumping it), a
 *    non-root user, an exec-form CMD that starts node on dist/cli.js (so SIGTERM
 *    reaches node), the three ports, production-only dependencies, and no
 *    HEALTHCHECK that starts a second Node process.
 * 2. The runtime stage's steps are then performed for real in a temp folder:
 *    the same files are copied in, `npm ci --omit=dev` installs production
 *    dependencies only, and the CLI is started the way the CMD starts it (as
 *    uid 1000 when the test runs as root, like `USER 1000:1000`). It must log
 *    its "listening" line, answer GET /health on the ops port, and exit 0 on
 *    SIGTERM.
 */
import t, { type Test } from 'tap'
import { ROOT } from './helpers/root.js'
import { nodeFlagsOf } from './helpers/process.js'
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { chmodSync, chownSync, cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { basename, dirname, join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

const root = ROOT

// npm ci may have to fetch packages; the whole file gets more than the default.
t.setTimeout(300_000)
t.comment(`running on node ${process.version} (${process.execPath})`)

// ---------------------------------------------------------------------------
// A small Dockerfile reader: enough for instructions, stages and exec forms.
// ---------------------------------------------------------------------------

interface Instruction {
  keyword: string
  args: string
  line: number
}

interface Stage {
  image: string
  name: string | null
  index: number
  instructions: Instruction[]
}

function readInstructions (text: string): Instruction[] {
  const out: Instruction[] = []
  let buffer: string | null = null
  let startLine = 0
  text.split(/\r?\n/).forEach((raw, i) => {
    const trimmed = raw.trim()
    // Comment lines (and parser directives) are dropped, also inside a continuation.
    if (trimmed.startsWith('#')) return
    if (buffer === null) {
      if (trimmed === '') return
      buffer = ''
      startLine = i + 1
    }
    if (/\\\s*$/.test(raw)) {
      buffer += raw.replace(/\\\s*$/, '') + ' '
      return
    }
    buffer += raw
    const m = /^\s*(\S+)\s*([\s\S]*)$/.exec(buffer)
    if (m !== null) out.push({ keyword: (m[1] as string).toUpperCase(), args: (m[2] as string).trim(), line: startLine })
    buffer = null
  })
  return out
}

function substituteArgs (value: string, args: Map<string, string>): string {
  return value.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)/g,
    (whole, braced: string | undefined, fallback: string | undefined, bare: string | undefined) => {
      const name = braced ?? bare ?? ''
      const found = args.get(name)
      if (found !== undefined && found !== '') return found
      return fallback ?? whole
    })
}

function parseDockerfile (text: string): Stage[] {
  const globalArgs = new Map<string, string>()
  const stages: Stage[] = []
  for (const ins of readInstructions(text)) {
    if (ins.keyword === 'FROM') {
      const words = ins.args.split(/\s+/).filter(w => !w.startsWith('--'))
      const image = substituteArgs(words[0] ?? '', globalArgs)
      const name = words[1]?.toLowerCase() === 'as' ? (words[2] ?? null) : null
      stages.push({ image, name, index: stages.length, instructions: [] })
      continue
    }
    const current = stages[stages.length - 1]
    if (current === undefined) {
      if (ins.keyword === 'ARG') {
        const m = /^([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$/.exec(ins.args)
        if (m !== null) globalArgs.set(m[1] as string, (m[2] ?? '').replace(/^"(.*)"$/, '$1'))
      }
      continue
    }
    current.instructions.push(ins)
  }
  return stages
}

/** `["a", "b"]` → ['a', 'b']; shell form → null. */
function execForm (args: string): string[] | null {
  if (!args.startsWith('[')) return null
  try {
    const parsed: unknown = JSON.parse(args)
    if (Array.isArray(parsed) && parsed.every(x => typeof x === 'string')) return parsed as string[]
  } catch {}
  return null
}

/** Stage lookup by name or index, as `FROM <stage>` and `COPY --from=<stage>` use it. */
function findStage (stages: Stage[], ref: string): Stage | undefined {
  return stages.find(s => s.name !== null && s.name.toLowerCase() === ref.toLowerCase()) ??
    (/^\d+$/.test(ref) ? stages[Number(ref)] : undefined)
}

/** A stage's instructions including those of the stages it is built `FROM`. */
function lineage (stages: Stage[], stage: Stage): { base: string, instructions: Instruction[] } {
  const parent = findStage(stages.slice(0, stage.index), stage.image)
  if (parent === undefined) return { base: stage.image, instructions: stage.instructions }
  const up = lineage(stages, parent)
  return { base: up.base, instructions: [...up.instructions, ...stage.instructions] }
}

interface Copy {
  from: string | null
  sources: string[]
  dest: string
}

function parseCopy (args: string): Copy {
  const exec = execForm(args)
  const words = exec ?? args.split(/\s+/)
  let from: string | null = null
  const rest: string[] = []
  for (const w of words) {
    const m = /^--from=(.+)$/.exec(w)
    if (m !== null) from = m[1] as string
    else if (!w.startsWith('--')) rest.push(w)
  }
  return { from, sources: rest.slice(0, -1), dest: rest[rest.length - 1] ?? '' }
}

const normalize = (p: string): string => p.replace(/^\.\//, '').replace(/\/+$/, '')

/** `ENV A=1 B="2 3"` or `ENV A 1` → pairs. */
function parseEnv (args: string): Array<[string, string]> {
  const unquote = (v: string): string => v.replace(/^"(.*)"$/s, '$1').replace(/^'(.*)'$/s, '$1').replace(/\\(.)/g, '$1')
  if (!/^[A-Za-z_][A-Za-z0-9_]*=/.test(args)) {
    const m = /^(\S+)\s+([\s\S]*)$/.exec(args)
    return m === null ? [] : [[m[1] as string, unquote((m[2] as string).trim())]]
  }
  const out: Array<[string, string]> = []
  for (const m of args.matchAll(/([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|'[^']*'|\S*)/g)) {
    out.push([m[1] as string, unquote(m[2] as string)])
  }
  return out
}

const dockerfileText = readFileSync(join(root, 'Dockerfile'), 'utf8')
const stages = parseDockerfile(dockerfileText)
const runtime = stages[stages.length - 1]
const runtimeInstructions = runtime === undefined ? [] : lineage(stages, runtime).instructions
const lastOf = (keyword: string): Instruction | undefined => runtimeInstructions.filter(i => i.keyword === keyword).at(-1)
/** The environment the runtime image sets with ENV. */
const imageEnv: Record<string, string> = Object.fromEntries(runtimeInstructions.filter(i => i.keyword === 'ENV').flatMap(i => parseEnv(i.args)))
const exposedPorts = runtimeInstructions.filter(i => i.keyword === 'EXPOSE').flatMap(i => i.args.split(/\s+/)).map(p => p.replace(/\/(tcp|udp)$/i, ''))
const cmdLine = lastOf('CMD')
const cmdArgv = cmdLine === undefined ? null : execForm(cmdLine.args)
/** The Node flags the CMD starts the service with (between `node` and `dist/cli.js`). */
const cmdNodeFlags = cmdArgv === null ? [] : nodeFlagsOf(cmdArgv)
const healthcheck = lastOf('HEALTHCHECK')

/** Images of stages that come from a registry (not an earlier stage) without an `@sha256:` digest. */
function unpinnedBases (of: Stage[]): string[] {
  return of.filter(s => findStage(of.slice(0, s.index), s.image) === undefined && !/@sha256:[0-9a-f]{64}$/.test(s.image)).map(s => s.image)
}

function startsNode (check: Instruction | undefined): boolean {
  return check !== undefined && !/^NONE$/i.test(check.args) && /\b(node|nodejs|npm|npx)\b/.test(check.args)
}

t.test('the pin and health-check rules catch what they are for', async t => {
  const digest = 'sha256:' + 'a'.repeat(64)
  const pinned = parseDockerfile(`ARG IMAGE=node:24-bookworm-slim@${digest}\nFROM \${IMAGE} AS build\nFROM build AS test\nFROM \${IMAGE}\n`)
  t.same(unpinnedBases(pinned), [], 'an ARG with a digest, and a stage built FROM another stage, pass')
  const loose = parseDockerfile(`FROM node:24-bookworm-slim@${digest} AS build\nFROM node:24-bookworm-slim\n`)
  t.same(unpinnedBases(loose), ['node:24-bookworm-slim'], 'a tag without a digest is reported')
  const check = (text: string): Instruction | undefined => readInstructions(text).find(i => i.keyword === 'HEALTHCHECK')
  t.ok(startsNode(check('HEALTHCHECK --interval=10s CMD ["node", "-e", "fetch(1)"]')), 'a node HEALTHCHECK is caught')
  t.notOk(startsNode(check('HEALTHCHECK NONE')), 'HEALTHCHECK NONE is fine')
})

t.test('Dockerfile', async t => {
  t.ok(stages.length >= 2, `multi-stage build (${stages.length} FROM)`)
  if (runtime === undefined || stages.length < 2) return

  const { base } = lineage(stages, runtime)
  const runtimeOnly = runtime.instructions

  t.match(base, /(^|\/)node:24([.-]|$|@)|(^|\/)nodejs24([.-]|:|$)/, `runtime image is Node 24 (${base})`)

  // Every image pulled from a registry (not an earlier stage) is pinned by digest: a tag moves.
  t.same(unpinnedBases(stages), [], `every base image is pinned by digest (${[...new Set(stages.map(s => s.image))].join(', ')})`)
  t.match(dockerfileText, /^#.*\bbump\b/im, 'a comment says how to bump the pinned digest')

  // Build stage: a full install and the TypeScript build.
  const builder = stages.find(s => s !== runtime && s.instructions.some(i => i.keyword === 'RUN' && /\bnpm run build\b/.test(i.args)))
  t.ok(builder, 'a build stage runs `npm run build`')
  if (builder !== undefined) {
    const runs = lineage(stages, builder).instructions.filter(i => i.keyword === 'RUN').map(i => i.args)
    t.ok(runs.some(r => /\bnpm ci\b/.test(r)), 'the build stage installs with `npm ci`')
    // `npm run build` runs what package.json says; a script file it names must be in the stage.
    const buildScript = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts.build ?? ''
    const copied = lineage(stages, builder).instructions.filter(i => i.keyword === 'COPY' && parseCopy(i.args).from === null).flatMap(i => parseCopy(i.args).sources.map(normalize))
    for (const file of buildScript.match(/\bscripts\/[^\s]+/g) ?? []) {
      t.ok(copied.some(s => file === s || file.startsWith(`${s}/`)), `the build stage copies ${file}, which \`npm run build\` runs`)
    }
  }

  // Production dependencies only, from the lockfile.
  const omitDev = (s: string): boolean => /\bnpm ci\b/.test(s) && /--omit[= ]dev\b/.test(s)
  const runsOmitDev = runtimeOnly.some(i => i.keyword === 'RUN' && omitDev(i.args))
  const copiesOmitDevModules = runtimeOnly.some(i => {
    if (i.keyword !== 'COPY') return false
    const c = parseCopy(i.args)
    if (c.from === null || !c.sources.some(s => /node_modules/.test(s))) return false
    const src = findStage(stages, c.from)
    return src !== undefined && lineage(stages, src).instructions.some(j => j.keyword === 'RUN' && omitDev(j.args))
  })
  t.ok(runsOmitDev || copiesOmitDevModules, 'runtime dependencies come from `npm ci --omit=dev`')
  t.notOk(runtimeOnly.some(i => i.keyword === 'RUN' && /\bnpm (install|i)\b/.test(i.args)), 'runtime does not `npm install` (lockfile only)')

  // What the runtime stage takes from the build context: exactly what the
  // second part of this file copies into its temp folder.
  const copies = runtimeOnly.filter(i => i.keyword === 'COPY' || i.keyword === 'ADD').map(i => parseCopy(i.args))
  const fromContext = copies.filter(c => c.from === null).flatMap(c => c.sources.map(normalize))
  const replicated = new Set(['package.json', 'package-lock.json', 'config'])
  t.same(fromContext.filter(s => !replicated.has(s)), [], `runtime copies from the context only ${[...replicated].join(', ')} (got ${fromContext.join(', ')})`)
  for (const needed of ['package.json', 'package-lock.json', 'config']) {
    t.ok(fromContext.includes(needed), `runtime copies ${needed}`)
  }
  t.ok(copies.some(c => c.from !== null && c.sources.some(s => /(^|\/)dist\/?$/.test(s))), 'runtime copies dist/ from the build stage')
  t.notOk(fromContext.includes('node_modules') || fromContext.includes('dist'), 'nothing host-built is copied in')

  // Environment.
  t.equal(imageEnv.NODE_ENV, 'production', 'ENV NODE_ENV=production')

  // Non-root user.
  const user = lastOf('USER')
  t.ok(user, 'runtime sets USER')
  if (user !== undefined) {
    const name = (user.args.split(':')[0] ?? '').trim()
    t.ok(name !== '' && name !== 'root' && name !== '0', `USER is not root (${user.args})`)
  }

  // Ports.
  for (const port of ['14001', '14020', '14000']) t.ok(exposedPorts.includes(port), `EXPOSE ${port}`)

  // Command: node directly, exec form, so SIGTERM reaches node and not a shell or npm.
  const entrypoint = lastOf('ENTRYPOINT')
  if (entrypoint !== undefined) {
    const argv = execForm(entrypoint.args)
    t.ok(argv, 'ENTRYPOINT (if any) is exec form')
    t.notMatch(argv?.[0] ?? '', /(^|\/)(npm|npx|sh|bash)$/, 'ENTRYPOINT (if any) is not npm or a shell')
  }
  t.ok(cmdLine, 'runtime has a CMD')
  const argv = cmdArgv
  t.ok(argv, `CMD is exec form (${cmdLine?.args ?? 'none'})`)
  if (argv !== null) {
    t.ok(argv[0] === 'node' || basename(argv[0] ?? '') === 'node', `CMD starts with node (${argv[0] ?? ''})`)
    t.ok(argv.some(a => normalize(a) === 'dist/cli.js' || a.endsWith('/dist/cli.js')), 'CMD runs dist/cli.js')
    t.ok(argv.includes('start'), 'CMD runs `start`')
    t.ok(argv.includes('--config'), 'CMD passes --config')
    t.notOk(argv.some(a => /^(npm|npx)$/.test(a)), 'CMD does not go through npm')
    // Node 24 sizes V8's young generation from the memory it sees: 128 MiB with no limit (the
    // sidecar holds 230 MiB under load), 4 MiB in a 256 MiB pod (about 40 % more CPU per request).
    t.ok(cmdNodeFlags.some((a) => /^--max-semi-space-size=\d+$/.test(a)), `CMD fixes V8's young generation (${cmdNodeFlags.join(' ') || 'no flags'})`)
    // A command the comments suggest in place of the CMD keeps its Node flags too.
    for (const [line] of dockerfileText.matchAll(/^#.*\bnode\b.*\bdist\/cli\.js start\b.*$/gm)) {
      for (const flag of cmdNodeFlags) t.ok(line.includes(flag), `the suggested command keeps ${flag}: ${line.replace(/^#\s*/, '')}`)
    }
  }

  // Kubernetes probes GET /live and /ready; a HEALTHCHECK that runs node would start a second
  // Node process in the container every few seconds, inside the proxy's memory limit.
  t.notOk(startsNode(healthcheck), `no HEALTHCHECK starts a Node process (${healthcheck?.args ?? 'none'})`)
})

t.test('.dockerignore', async t => {
  const path = join(root, '.dockerignore')
  t.ok(existsSync(path), '.dockerignore exists')
  if (!existsSync(path)) return
  const patterns = new Set(readFileSync(path, 'utf8').split(/\r?\n/).map(l => l.trim()).filter(l => l !== '' && !l.startsWith('#')).map(p => normalize(p.replace(/^\//, ''))))
  for (const p of ['node_modules', 'dist', '.git', '.tap', 'coverage']) t.ok(patterns.has(p), `excludes ${p}`)
})

// ---------------------------------------------------------------------------
// The runtime stage, performed without Docker.
// ---------------------------------------------------------------------------

/**
 * The environment for child processes: this one less what npm, tap and a
 * developer's shell (BREAKWATER_*) put in it, plus the image's ENV.
 */
function cleanEnv (): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {}
  for (const [key, value] of Object.entries(process.env)) {
    if (/^(npm_|TAP|_TAPJS|TS_NODE|BREAKWATER_|NODE_OPTIONS$|NODE_V8_COVERAGE$|NODE_ENV$)/i.test(key)) continue
    env[key] = value
  }
  return { ...env, ...imageEnv }
}

/**
 * tap's process tracking wraps child_process and adds its own `--import` to
 * NODE_OPTIONS of every child, which then writes into .tap/ when it exits (and
 * fails to as uid 1000). A container has none of that: `env -u NODE_OPTIONS`
 * drops it and then execs the command, so the PID (and who gets SIGTERM) stays
 * the same.
 */
function untracked (command: string, args: string[]): [string, string[]] {
  return ['env', ['-u', 'NODE_OPTIONS', command, ...args]]
}

interface Run {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: string
  /** stdout and stderr, interleaved */
  output: string
  error?: Error
}

function run (command: string, args: string[], cwd: string, timeoutMs: number): Promise<Run> {
  return new Promise(done => {
    const child = spawn(...untracked(command, args), { cwd, env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'], timeout: timeoutMs })
    let stdout = ''
    let output = ''
    child.stdout.on('data', (chunk: Buffer) => { stdout += chunk.toString(); output += chunk.toString() })
    child.stderr.on('data', (chunk: Buffer) => { output += chunk.toString() })
    child.on('error', error => done({ code: null, signal: null, stdout, output, error }))
    child.on('close', (code, signal) => done({ code, signal, stdout, output }))
  })
}

const SERVICE_UID = 1000 // USER 1000:1000 in the Dockerfile (the image's `node` user)

/** Whether to start the service as SERVICE_UID: only as root, and only if that uid can run this node. */
function dropPrivileges (): boolean {
  if (typeof process.getuid !== 'function' || process.getuid() !== 0) return false
  const probe = spawnSync(...untracked(process.execPath, ['-e', '']), { uid: SERVICE_UID, gid: SERVICE_UID, env: cleanEnv(), timeout: 30_000 })
  return probe.status === 0
}

t.test('runtime stage without Docker', async t => {
  const cli = join(root, 'dist', 'cli.js')
  if (!existsSync(cli)) {
    t.fail('dist/cli.js is missing: run `npm run build` first (npm test does)')
    return
  }

  const tmpRoot = mkdtempSync(join(tmpdir(), 'breakwater-image-'))
  chmodSync(tmpRoot, 0o755)
  let service: ChildProcess | null = null
  t.teardown(() => {
    if (service !== null && service.exitCode === null && service.signalCode === null) service.kill('SIGKILL')
    rmSync(tmpRoot, { recursive: true, force: true })
  })

  // WORKDIR /app; COPY package.json package-lock.json ./; COPY --from=build /app/dist ./dist; COPY config ./config
  const app = join(tmpRoot, 'app')
  mkdirSync(app)
  for (const item of ['package.json', 'package-lock.json', 'dist', 'config']) {
    t.ok(existsSync(join(root, item)), `${item} exists to be copied`)
    if (existsSync(join(root, item))) cpSync(join(root, item), join(app, item), { recursive: true })
  }

  // RUN npm ci --omit=dev
  const started = Date.now()
  const install = await run('npm', ['ci', '--omit=dev', '--ignore-scripts', '--no-audit', '--no-fund', '--prefer-offline'], app, 180_000)
  t.comment(`npm ci --omit=dev took ${((Date.now() - started) / 1000).toFixed(1)} s`)
  t.equal(install.code, 0, 'npm ci --omit=dev succeeds', { output: install.output.slice(-4000), error: install.error?.message, signal: install.signal })
  if (install.code !== 0) return

  const pkg = JSON.parse(readFileSync(join(app, 'package.json'), 'utf8')) as {
    dependencies?: Record<string, string>
    devDependencies?: Record<string, string>
  }
  const lock = JSON.parse(readFileSync(join(app, 'package-lock.json'), 'utf8')) as {
    packages?: Record<string, { dev?: boolean }>
  }
  for (const name of Object.keys(pkg.dependencies ?? {})) {
    t.ok(existsSync(join(app, 'node_modules', name, 'package.json')), `production dependency ${name} is installed`)
  }
  for (const name of ['tap', 'typescript']) {
    t.notOk(existsSync(join(app, 'node_modules', name)), `no ${name} in the image`)
  }
  for (const name of Object.keys(pkg.devDependencies ?? {})) {
    // A dev dependency that a production package also needs is legitimately present.
    if (lock.packages?.[`node_modules/${name}`]?.dev !== true) continue
    t.notOk(existsSync(join(app, 'node_modules', name)), `dev dependency ${name} is not installed`)
  }
  const devOnly = Object.entries(lock.packages ?? {}).filter(([key, entry]) => key.startsWith('node_modules/') && entry.dev === true).map(([key]) => key)
  const leaked = devOnly.filter(key => existsSync(join(app, key)))
  t.same(leaked.slice(0, 20), [], `none of the ${devOnly.length} dev-only packages of the lockfile is installed`)

  // The config the CMD starts with: in the image, valid with the image's ENV,
  // and consistent with EXPOSE and the writable state directory.
  const configArg = cmdArgv?.includes('--config') === true ? cmdArgv[cmdArgv.indexOf('--config') + 1] : undefined
  t.ok(configArg, 'the CMD names a config file')
  if (configArg !== undefined) await checkImageConfig(t, app, configArg)

  // USER 1000:1000 — the state directory is the only thing it may write.
  const asService = dropPrivileges()
  const stateDir = join(tmpRoot, 'state')
  mkdirSync(stateDir)
  if (asService) chownSync(stateDir, SERVICE_UID, SERVICE_UID)
  t.comment(asService ? `starting the service as uid ${SERVICE_UID}` : `starting the service as uid ${process.getuid?.() ?? '?'} (cannot switch user here)`)

  const configPath = join(tmpRoot, 'breakwater.yaml')
  writeFileSync(configPath, [
    'service: dockertest',
    'version: "1"',
    `stateDir: ${JSON.stringify(stateDir)}`,
    'listen:',
    '  proxy: { host: 127.0.0.1, port: 0 }',
    '  ops:   { host: 127.0.0.1, port: 0 }',
    '  admin: { host: 127.0.0.1, port: 0 }',
    'upstreams:',
    '  app: { url: "http://127.0.0.1:1" }',
    'routes:',
    '  - match: { pathPrefix: / }',
    '    upstream: app',
    'shutdown: { drainDelayMs: 0, timeoutMs: 2000 }',
    ''
  ].join('\n'))

  // CMD ["node", <its Node flags>, "dist/cli.js", "start", "--config", ...]
  const child = spawn(...untracked(process.execPath, [...cmdNodeFlags, 'dist/cli.js', 'start', '--config', configPath]), {
    cwd: app,
    env: cleanEnv(),
    stdio: ['ignore', 'pipe', 'pipe'],
    ...(asService ? { uid: SERVICE_UID, gid: SERVICE_UID } : {})
  })
  service = child
  const stdoutLines: string[] = []
  let stderr = ''
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>(done => {
    child.on('exit', (code, signal) => done({ code, signal }))
    child.on('error', err => { stderr += `spawn failed: ${err.message}\n`; done({ code: null, signal: null }) })
  })
  const closed = new Promise<void>(done => child.on('close', () => done()))
  child.stderr?.on('data', (chunk: Buffer) => { stderr += chunk.toString() })
  const diagnostics = (): Record<string, string> => ({ stdout: stdoutLines.slice(-30).join('\n'), stderr: stderr.slice(-4000) })

  const listening = await new Promise<Record<string, unknown> | null>(done => {
    const timer = setTimeout(() => done(null), 30_000)
    const lines = createInterface({ input: child.stdout as NodeJS.ReadableStream })
    lines.on('line', line => {
      stdoutLines.push(line)
      let entry: unknown
      try { entry = JSON.parse(line) } catch { return }
      if (entry !== null && typeof entry === 'object' && (entry as Record<string, unknown>).msg === 'listening') {
        clearTimeout(timer)
        done(entry as Record<string, unknown>)
      }
    })
    void exited.then(() => { clearTimeout(timer); done(null) })
  })
  t.ok(listening, 'logs a "listening" line', diagnostics())
  if (listening === null) return

  const ops = listening.ops
  t.type(ops, 'string', 'the listening line has the ops URL')
  if (typeof ops !== 'string') return
  const response = await fetch(new URL('/health', ops), { signal: AbortSignal.timeout(10_000) })
  t.equal(response.status, 200, 'GET /health on the ops port is 200')
  const body = await response.json() as { status?: unknown }
  t.equal(body.status, 'ok', '/health says status ok')

  const proxy = listening.proxy
  if (typeof proxy === 'string') {
    const upstreamDown = await fetch(new URL('/', proxy), { signal: AbortSignal.timeout(10_000) })
    await upstreamDown.arrayBuffer()
    t.ok(upstreamDown.status >= 500 && upstreamDown.status <= 599, `the proxy port answers (${upstreamDown.status} with the upstream down)`)
  }

  // docker stop sends SIGTERM to PID 1, which is node itself.
  const stopAt = Date.now()
  child.kill('SIGTERM')
  const timeout = new Promise<'timeout'>(done => setTimeout(() => done('timeout'), 10_000).unref())
  const result = await Promise.race([exited, timeout])
  t.not(result, 'timeout', 'exits within 10 s of SIGTERM', diagnostics())
  if (result !== 'timeout') {
    t.same(result, { code: 0, signal: null }, `exits with code 0 on SIGTERM (after ${Date.now() - stopAt} ms)`, diagnostics())
    // 'close' comes once stdout is drained; then every line has been read.
    await Promise.race([closed, new Promise(done => setTimeout(done, 2_000).unref())])
    t.ok(stdoutLines.every(line => line.trim() === '' || isJson(line)), 'everything on stdout is JSON lines (pino)', diagnostics())
  }
})

interface ImageConfigView {
  stateDir: string
  listen: Record<'proxy' | 'ops' | 'admin', { host: string, port: number }>
}

async function checkImageConfig (t: Test, app: string, configArg: string): Promise<ImageConfigView | null> {
  t.ok(existsSync(resolve(app, configArg)), `the CMD's config ${configArg} is in the image`)
  const script = [
    "import { loadConfigFile } from './dist/index.js'",
    `const { config } = await loadConfigFile(${JSON.stringify(configArg)})`,
    'process.stdout.write(JSON.stringify({ stateDir: config.stateDir, listen: config.listen }))'
  ].join('\n')
  const loaded = await run(process.execPath, ['--input-type=module', '-e', script], app, 30_000)
  t.equal(loaded.code, 0, `${configArg} loads with the image's environment`, { output: loaded.output.slice(-4000) })
  if (loaded.code !== 0) return null
  const view = JSON.parse(loaded.stdout) as ImageConfigView
  for (const name of ['proxy', 'ops', 'admin'] as const) {
    const port = view.listen[name].port
    t.ok(exposedPorts.includes(String(port)), `${name} listens on ${port}, which the image EXPOSEs`)
  }
  for (const name of ['proxy', 'ops'] as const) {
    // The admin API may stay on loopback (it mutates state); these two must be reachable.
    const host = view.listen[name].host
    t.ok(['0.0.0.0', '::', ''].includes(host), `${name} binds all interfaces (${host}), so a published port reaches it`)
  }
  const writable = runtimeInstructions.some(i => i.keyword === 'RUN' && /\bchown\b/.test(i.args) && i.args.includes(view.stateDir))
  t.ok(writable, `the image makes stateDir ${view.stateDir} writable for its USER`)
  return view
}

function isJson (line: string): boolean {
  try {
    JSON.parse(line)
    return true
  } catch {
    return false
  }
}
