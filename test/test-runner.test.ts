/**
 * The runner behind `npm test` (scripts/test.mjs), run as a process on small test files of its
 * own in a temp folder laid out as the project is (dist-test/test/*.test.js): which files it
 * picks, `--grep`, the summary and the exit code. Its `tap build` step is a no-op there (a
 * `node_modules/.bin/tap` that does nothing), so the project's own tap build is never touched.
 */
import t, { type Test } from 'tap'
import { spawn } from 'node:child_process'
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { ROOT } from './helpers/root.js'

interface Run { code: number | null, stdout: string, stderr: string }

/** A temp project with these test files (name → source) under dist-test/test/. */
function project (t: Test, files: Record<string, string>): string {
  const dir = mkdtempSync(join(tmpdir(), 'breakwater-runner-'))
  t.teardown(() => { rmSync(dir, { recursive: true, force: true }) })
  mkdirSync(join(dir, 'dist-test', 'test'), { recursive: true })
  mkdirSync(join(dir, 'node_modules', '.bin'), { recursive: true })
  writeFileSync(join(dir, 'node_modules', '.bin', 'tap'), '#!/bin/sh\nexit 0\n')
  chmodSync(join(dir, 'node_modules', '.bin', 'tap'), 0o755)
  // The test files import the project's tap, as the real ones do.
  symlinkSync(join(ROOT, 'node_modules', 'tap'), join(dir, 'node_modules', 'tap'))
  symlinkSync(join(ROOT, 'node_modules', '@tapjs'), join(dir, 'node_modules', '@tapjs'))
  for (const [name, source] of Object.entries(files)) writeFileSync(join(dir, 'dist-test', 'test', name), source)
  return dir
}

async function runner (cwd: string, args: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  const child = spawn(process.execPath, [join(ROOT, 'scripts', 'test.mjs'), ...args], { cwd, env: { ...process.env, TAP_GREP: undefined, ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (c: Buffer) => { stdout += c.toString('utf8') })
  child.stderr.on('data', (c: Buffer) => { stderr += c.toString('utf8') })
  const code = await new Promise<number | null>((resolve) => child.on('close', (c) => { resolve(c) }))
  return { code, stdout, stderr }
}

const passing = (name: string): string => `import t from 'tap'\nt.test('${name} one', async (t) => { t.pass('fine') })\nt.test('${name} two', async (t) => { t.pass('fine too') })\n`
const failing = "import t from 'tap'\nt.test('breaks', async (t) => { t.equal(1, 2, 'one is not two') })\nt.test('holds', async (t) => { t.pass('fine') })\n"

t.test('every file under dist-test/test, each run once; all passing: exit 0 and the summary', async (t) => {
  const dir = project(t, { 'a.test.js': passing('a'), 'b.test.js': passing('b'), 'notes.js': 'throw new Error("not a test file")\n' })
  const run = await runner(dir)
  t.equal(run.code, 0, 'exit 0')
  t.match(run.stdout, /^TAP version 14$/m)
  t.match(run.stdout, /^ok \d+ - dist-test\/test\/a\.test\.js/m)
  t.match(run.stdout, /^ok \d+ - dist-test\/test\/b\.test\.js/m)
  t.notMatch(run.stdout, /notes\.js/, 'a file not named *.test.js is not run')
  t.match(run.stdout, /# 2 files, 0 failed/)
  t.match(run.stdout, /^# \{ total: 4, pass: 4 \}$/m, 'tap\'s counts, added up')
})

t.test('a failing file: its TAP and failure in the output, the others still run, exit 1', async (t) => {
  const dir = project(t, { 'a.test.js': passing('a'), 'broken.test.js': failing, 'crash.test.js': 'process.exit(3)\n' })
  const run = await runner(dir)
  t.equal(run.code, 1)
  t.match(run.stdout, /not ok \d+ - one is not two/, 'the failing assertion, as tap printed it')
  t.match(run.stdout, /^not ok \d+ - dist-test\/test\/broken\.test\.js \(exit 1\)/m)
  t.match(run.stdout, /^not ok \d+ - dist-test\/test\/crash\.test\.js \(exit 3\)/m, 'a file that ends before tap counts fails too')
  t.match(run.stdout, /^ok \d+ - dist-test\/test\/a\.test\.js/m)
  t.match(run.stdout, /# 3 files, 2 failed/)
  t.match(run.stdout, /^# \{ total: 5, pass: 3, fail: 2 \}$/m, 'the file that counted nothing is one failure')
})

t.test('files named on the command line: only those, by name or path; an unknown name is exit 2 saying which', async (t) => {
  const dir = project(t, { 'a.test.js': passing('a'), 'b.test.js': failing, 'c.test.js': passing('c') })
  for (const args of [['a', 'c'], ['test/a.test.ts', 'c.test.js']]) {
    const run = await runner(dir, args)
    t.equal(run.code, 0, `${args.join(' ')}: exit 0`)
    t.match(run.stdout, /# 2 files, 0 failed/)
    t.notMatch(run.stdout, /b\.test\.js/, 'the failing file not named is not run')
  }
  const unknown = await runner(dir, ['a', 'nope'])
  t.equal(unknown.code, 2)
  t.match(unknown.stderr, /no compiled test file for: nope/)
  t.notMatch(unknown.stdout, /a\.test\.js/, 'nothing run')
})

t.test('--grep runs only the subtests whose names match, in every file', async (t) => {
  const dir = project(t, { 'a.test.js': passing('a'), 'b.test.js': failing })
  const run = await runner(dir, ['--grep', 'holds|two'])
  t.equal(run.code, 0, 'exit 0')
  t.match(run.stdout, /ok \d+ - holds/)
  t.match(run.stdout, /ok \d+ - a two/)
  t.match(run.stdout, /ok \d+ - breaks # SKIP filter/, 'the failing subtest filtered out')
  t.match(run.stdout, /ok \d+ - a one # SKIP filter/)
  const none = await runner(dir, ['--grep', 'breaks'])
  t.equal(none.code, 1, 'the chosen subtest fails: exit 1')
})

t.test('a bad job count in the environment is exit 2, naming it', async (t) => {
  const dir = project(t, { 'a.test.js': passing('a') })
  const run = await runner(dir, [], { BREAKWATER_TEST_JOBS: '0' })
  t.equal(run.code, 2)
  t.match(run.stderr, /BREAKWATER_TEST_JOBS must be a whole number of at least 1, not '0'/)
})

t.test('a file that exits but leaves a process holding its output fails, saying so, and does not hold the run', async (t) => {
  const dir = project(t, {
    'a.test.js': passing('a'),
    // Passes, then leaves a process behind with the file's own stdout and stderr.
    'leaky.test.js': `import t from 'tap'\nimport { spawn } from 'node:child_process'\nimport { writeFileSync } from 'node:fs'\nconst child = spawn('sleep', ['30'], { stdio: 'inherit', detached: true })\nwriteFileSync('left.pid', String(child.pid))\nchild.unref()\nt.pass('fine')\n`
  })
  t.teardown(() => {
    try { process.kill(Number(readFileSync(join(dir, 'left.pid'), 'utf8')), 'SIGKILL') } catch {}
  })
  const run = await runner(dir)
  t.equal(run.code, 1, 'exit 1')
  t.match(run.stdout, /^not ok \d+ - dist-test\/test\/leaky\.test\.js/m)
  t.match(run.stdout, /left a process running that holds its output open/)
  t.match(run.stdout, /^ok \d+ - dist-test\/test\/a\.test\.js/m)
})
