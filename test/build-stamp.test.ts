/**
 * `scripts/build.mjs`: `npm run build` always compiles; `npm start` (`--if-stale`) compiles only
 * when what decides the output changed since the last successful build. Exercised on a tiny
 * project in a temp folder (`--root`), never on this checkout's dist/, which other tests read.
 */
import t from 'tap'
import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { isBuiltin } from 'node:module'
import { dirname, join, relative } from 'node:path'
import { pathToFileURL } from 'node:url'
import { ROOT } from './helpers/root.js'
import { childEnv, startProcess, tempDir } from './helpers/process.js'

const SCRIPT = join(ROOT, 'scripts', 'build.mjs')
const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string>, engines: { node: string } }

/** The bundled command: dist/cli.js and the chunks it loads. */
function bundleFiles (): string[] {
  return [join(ROOT, 'dist', 'cli.js'), ...readdirSync(join(ROOT, 'dist', 'chunks')).filter((f) => f.endsWith('.js')).map((f) => join(ROOT, 'dist', 'chunks', f))]
}

interface Build { code: number | null, out: string }

function build (root: string, ...args: string[]): Build {
  const run = spawnSync(process.execPath, [SCRIPT, '--root', root, ...args], { encoding: 'utf8', timeout: 120_000, env: childEnv() })
  return { code: run.status, out: `${run.stdout}${run.stderr}` }
}

/** A project of one source file, laid out like this one. */
function tinyProject (root: string): void {
  mkdirSync(join(root, 'src', 'lib'), { recursive: true })
  writeFileSync(join(root, 'tsconfig.json'), JSON.stringify({ compilerOptions: { target: 'ES2022', module: 'ES2022', strict: true, outDir: 'dist', rootDir: 'src', types: [], skipLibCheck: true }, include: ['src'] }))
  writeFileSync(join(root, 'package.json'), JSON.stringify({ name: 'tiny', version: '1.0.0', type: 'module' }))
  writeFileSync(join(root, 'package-lock.json'), JSON.stringify({ name: 'tiny', lockfileVersion: 3, packages: {} }))
  writeFileSync(join(root, 'src', 'lib', 'answer.ts'), 'export const answer: number = 41\n')
}

const STAMP = (root: string): string => join(root, 'dist', '.build-stamp')
const OUTPUT = (root: string): string => join(root, 'dist', 'lib', 'answer.js')
/** Mark the compiled file so that a later tsc run shows (it rewrites the file). */
const mark = (root: string): void => writeFileSync(OUTPUT(root), readFileSync(OUTPUT(root), 'utf8') + '// not rebuilt\n')
const rebuilt = (root: string): boolean => !readFileSync(OUTPUT(root), 'utf8').includes('// not rebuilt')

t.test('package.json: build always compiles, prestart and pretest only when stale', async (t) => {
  t.equal(pkg.scripts.build, 'node scripts/build.mjs')
  t.equal(pkg.scripts.prestart, 'node scripts/build.mjs --if-stale')
  t.equal(pkg.scripts.pretest, 'node scripts/build.mjs --if-stale && node scripts/build.mjs --tests --if-stale')
})

t.test('--tests --if-stale: the suite (test/tsconfig.json → dist-test/) has a stamp of its own, over test/ too', async (t) => {
  const root = tempDir(t)
  tinyProject(root)
  mkdirSync(join(root, 'test'))
  writeFileSync(join(root, 'test', 'tsconfig.json'), JSON.stringify({ extends: '../tsconfig.json', compilerOptions: { rootDir: '..', outDir: '../dist-test' }, include: ['../src', '.'] }))
  writeFileSync(join(root, 'test', 'answer.test.ts'), 'import { answer } from \'../src/lib/answer.js\'\nexport const checked: number = answer\n')
  const compiled = join(root, 'dist-test', 'test', 'answer.test.js')

  const first = build(root, '--tests', '--if-stale')
  t.equal(first.code, 0, first.out)
  t.match(first.out, /dist-test\/ compiled in/, 'no stamp yet: compiled')
  t.ok(existsSync(compiled), 'the test file, compiled')
  t.ok(existsSync(join(root, 'dist-test', 'src', 'lib', 'answer.js')), 'with the sources it imports')
  t.notOk(existsSync(join(root, 'dist', 'cli.js')), 'nothing bundled')
  t.match(readFileSync(join(root, 'dist-test', '.build-stamp'), 'utf8'), /^[0-9a-f]{64}\n$/)
  t.notOk(existsSync(STAMP(root)), 'the app\'s stamp is not written')

  const again = build(root, '--tests', '--if-stale')
  t.match(again.out, /dist-test\/ is up to date/, 'nothing changed: tsc skipped')

  writeFileSync(compiled, '// not rebuilt\n')
  writeFileSync(join(root, 'test', 'answer.test.ts'), 'import { answer } from \'../src/lib/answer.js\'\nexport const checked: number = answer + 1\n')
  const changed = build(root, '--tests', '--if-stale')
  t.equal(changed.code, 0, changed.out)
  t.match(readFileSync(compiled, 'utf8'), /answer \+ 1/, 'a changed test file: compiled again')
})

t.test('--if-stale: a fresh stamp skips tsc; a changed input compiles again; a failed build leaves no stamp', async (t) => {
  const root = tempDir(t)
  tinyProject(root)

  const first = build(root, '--if-stale')
  t.equal(first.code, 0, first.out)
  t.match(first.out, /compiled in/, 'no stamp yet: compiled')
  t.match(readFileSync(OUTPUT(root), 'utf8'), /answer = 41/)
  t.match(readFileSync(STAMP(root), 'utf8'), /^[0-9a-f]{64}\n$/, 'the stamp holds a SHA-256')

  mark(root)
  const again = build(root, '--if-stale')
  t.equal(again.code, 0, again.out)
  t.match(again.out, /up to date/)
  t.notOk(rebuilt(root), 'nothing changed: tsc did not run')

  writeFileSync(join(root, 'src', 'lib', 'answer.ts'), 'export const answer: number = 42\n')
  const changed = build(root, '--if-stale')
  t.equal(changed.code, 0, changed.out)
  t.match(changed.out, /compiled in/, 'a changed source file: compiled')
  t.match(readFileSync(OUTPUT(root), 'utf8'), /answer = 42/)

  mark(root)
  writeFileSync(join(root, 'package-lock.json'), JSON.stringify({ name: 'tiny', lockfileVersion: 3, packages: { '': { version: '1.0.1' } } }))
  const locked = build(root, '--if-stale')
  t.match(locked.out, /compiled in/, 'a changed lockfile: compiled')
  t.ok(rebuilt(root))

  // Without --if-stale (`npm run build`) it always compiles.
  mark(root)
  const forced = build(root)
  t.equal(forced.code, 0, forced.out)
  t.ok(rebuilt(root), 'compiled though nothing changed')

  writeFileSync(join(root, 'src', 'lib', 'answer.ts'), 'export const answer: number = "forty-two"\n')
  const failed = build(root, '--if-stale')
  t.not(failed.code, 0, 'a type error fails the build')
  t.match(failed.out, /TS2322/)
  t.notOk(existsSync(STAMP(root)), 'no stamp after a failed build: the next start compiles again rather than run stale output')
})

t.test('the bundled command is one byte per character in V8 (Latin-1 only)', async (t) => {
  const { wideCharacter } = await import(pathToFileURL(join(ROOT, 'scripts', 'bundle.mjs')).href) as { wideCharacter: (text: string) => string | null }
  t.equal(wideCharacter('café, naïve'), null, 'Latin-1 is one byte per character')
  t.match(wideCharacter('// the response’s type') ?? '', /^U\+2019 at offset 15/)
  const files = bundleFiles()
  t.ok(files.length > 1, 'the command and its lazily loaded chunks')
  for (const file of files) t.equal(wideCharacter(readFileSync(file, 'utf8')), null, file)
})

t.test('the bundled command holds only the undici it calls: no fetch, WebSocket, mock agents or cache stores', async (t) => {
  // src/undici.ts takes undici's dispatchers from its own files; an import of 'undici' itself
  // (other than `import type`) would bring its whole index back into every sidecar's memory.
  const files = bundleFiles()
  const text = files.map((f) => readFileSync(f, 'utf8')).join('\n')
  t.match(text, /UND_ERR_HEADERS_TIMEOUT/, 'undici\'s dispatchers are in it')
  for (const name of ['MockAgent', 'SnapshotAgent', 'WebSocketStream', 'SqliteCacheStore', 'MemoryCacheStore', 'RetryAgent']) {
    t.notOk(text.includes(name), `${name} is not`)
  }
})

t.test('the bundled command reaches Node\'s own modules with require(), never an ES import', async (t) => {
  // Node's ES import of one of its modules reads every export, getters included: on Node 24,
  // `import … from 'node:http'` reads `http.WebSocket` and loads Node's own copy of undici.
  const files = bundleFiles()
  const specifiers = files.flatMap((f) => [...readFileSync(f, 'utf8').matchAll(/(?:\bfrom|\bimport)\s*\(?\s*["']([^"']+)["']/g)].map((m) => m[1] as string))
  t.ok(specifiers.some((s) => s.startsWith('./')), 'the chunks import one another')
  t.same(specifiers.filter((s) => isBuiltin(s)), [], 'no ES import of a Node module')
})

t.test('every chunk the bundled command loads with import() names its exports', async (t) => {
  // In a chunk of its own, a CommonJS module (one of Node's, or a dependency's file) would
  // expose only `default`: `(await import('node:https')).request` undefined, the span exporter
  // without node:http's Agent.
  const targets = new Set<string>()
  for (const file of bundleFiles()) {
    for (const m of readFileSync(file, 'utf8').matchAll(/\bimport\(\s*"(\.\/[^"]+)"\s*\)/g)) targets.add(join(dirname(file), m[1] as string))
  }
  t.ok(targets.size > 5, `the command's lazily loaded chunks (${targets.size})`)
  for (const target of targets) {
    const named = [...readFileSync(target, 'utf8').matchAll(/\bexport\s*\{([^}]*)\}/g)]
      .flatMap((m) => (m[1] as string).split(',').map((entry) => entry.trim().split(/\s+as\s+/).pop() as string))
      .filter((name) => name !== '' && name !== 'default')
    t.ok(named.length > 0, `${relative(ROOT, target)} names ${named.length} exports`)
  }

  const { plainExports } = await import(pathToFileURL(join(ROOT, 'scripts', 'bundle.mjs')).href) as { plainExports: (name: string) => string[] }
  const http = plainExports('node:http')
  t.ok(http.includes('Agent') && http.includes('request'), 'a Node module\'s values are named')
  t.notOk(http.includes('globalAgent') || http.includes('WebSocket'), 'its getters are not (they are read only through default)')
})

t.test('a running sidecar leaves Node\'s own undici (fetch, WebSocket) unloaded', async (t) => {
  const dir = tempDir(t)
  const preload = join(dir, 'modules.cjs')
  const out = join(dir, 'modules.txt')
  writeFileSync(preload, `process.on('exit', () => require('node:fs').writeFileSync(${JSON.stringify(out)}, process.moduleLoadList.join('\\n')))\n`)
  const sidecar = await startProcess(t, { upstreams: { app: { url: 'http://127.0.0.1:9' } }, routes: [{ name: 'all', match: { pathPrefix: '/' }, upstream: 'app' }] }, { NODE_OPTIONS: `--require ${preload}` })
  sidecar.child.kill('SIGTERM')
  t.equal(await sidecar.exited, 0, 'it stops cleanly')
  const loaded = readFileSync(out, 'utf8').split('\n')
  t.ok(loaded.includes('NativeModule http'), 'the list is of this process: it holds node:http')
  t.notOk(loaded.some((m) => m.includes('internal/deps/undici')), 'Node\'s undici is not loaded')
})

t.test('on a Node without process.getBuiltinModule the bundled command says which Node it needs', async (t) => {
  const run = spawnSync(process.execPath, ['--import', 'data:text/javascript,delete process.getBuiltinModule', join(ROOT, 'dist', 'cli.js'), '--version'], { encoding: 'utf8', timeout: 60_000, env: childEnv() })
  t.equal(run.status, 1, 'exit 1')
  t.equal(run.stderr, `breakwater: needs Node.js ${pkg.engines.node}; this is ${process.version}\n`, 'names the engines range and this Node')
  t.equal(run.stdout, '', 'nothing else')
})
