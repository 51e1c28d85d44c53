#!/usr/bin/env node
// Compile TypeScript (src/ → dist/), bundle the command (dist/cli.js, scripts/bundle.mjs) and
// stamp the result.
//
//   node scripts/build.mjs              always compile (`npm run build`)
//   node scripts/build.mjs --if-stale   compile only when the inputs changed since the last
//                                       build (`npm start`'s prestart)
//   --tests                             compile the test suite instead (test/tsconfig.json:
//                                       src/ and test/ → dist-test/, no bundle; `npm test`'s
//                                       pretest, with --if-stale)
//   --root DIR                          the project to build (default: this script's project)
//
// The stamp, dist/.build-stamp, holds a SHA-256 over what decides the output: every file under
// src/ (its path and bytes), tsconfig.json, package.json, package-lock.json and the version of
// the TypeScript compiler and of the bundler. Hashing takes milliseconds; tsc takes seconds. The stamp is removed
// before tsc runs and written only when it succeeds, so a failed build is never taken as fresh.
// The tests' stamp, dist-test/.build-stamp, covers test/ and test/tsconfig.json as well.
import { spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join, relative, resolve, sep } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { bundle, bundler } from './bundle.mjs'

const here = dirname(fileURLToPath(import.meta.url))
/** What each kind of build reads, where it writes, and where its stamp is. */
const TARGETS = {
  app: { out: 'dist', tsconfig: 'tsconfig.json', files: ['tsconfig.json', 'package.json', 'package-lock.json'], dirs: ['src'] },
  tests: { out: 'dist-test', tsconfig: join('test', 'tsconfig.json'), files: ['tsconfig.json', 'test/tsconfig.json', 'package.json', 'package-lock.json'], dirs: ['src', 'test'] }
}

/** Every file under `dir`, as sorted paths relative to `root` with `/` separators. */
function filesUnder (root, dir) {
  const out = []
  const walk = (abs) => {
    for (const entry of readdirSync(abs, { withFileTypes: true })) {
      const path = join(abs, entry.name)
      if (entry.isDirectory()) walk(path)
      else if (entry.isFile()) out.push(relative(root, path).split(sep).join('/'))
    }
  }
  if (existsSync(join(root, dir))) walk(join(root, dir))
  return out.sort()
}

/** The TypeScript compiler that builds `root`, resolved from the project (or from this script's). */
function compiler (root) {
  for (const from of [join(root, 'package.json'), join(here, '..', 'package.json')]) {
    try {
      const require = createRequire(from)
      const tsc = require.resolve('typescript/bin/tsc')
      const { version } = require('typescript/package.json')
      return { tsc, version }
    } catch {}
  }
  return null
}

/** SHA-256 of the build's inputs: each one's path, then its length and bytes (no two inputs can collide by concatenation). */
function inputsHash (root, target, tscVersion, bundlerVersion) {
  const hash = createHash('sha256').update(`typescript ${tscVersion ?? 'none'}\n`)
  if (bundlerVersion !== undefined) hash.update(`esbuild ${bundlerVersion}\n`)
  const files = [...target.files.filter((f) => existsSync(join(root, f))), ...target.dirs.flatMap((d) => filesUnder(root, d))]
  for (const file of files) {
    const bytes = readFileSync(join(root, file))
    hash.update(`${file}\n${bytes.length}\n`).update(bytes)
  }
  return hash.digest('hex')
}

async function main () {
  const { values } = parseArgs({ options: { 'if-stale': { type: 'boolean' }, tests: { type: 'boolean' }, root: { type: 'string' } } })
  const root = resolve(values.root ?? join(here, '..'))
  const target = values.tests === true ? TARGETS.tests : TARGETS.app
  const stampPath = join(root, target.out, '.build-stamp')
  const tsc = compiler(root)
  // Only a project with a command to bundle needs the bundler; the tests are never bundled.
  const bundles = target === TARGETS.app && existsSync(join(root, 'src', 'cli.ts'))
  const esbuild = bundles ? bundler(root) : null
  const hash = inputsHash(root, target, tsc?.version, bundles ? esbuild?.version ?? 'none' : undefined)

  if (values['if-stale'] === true && existsSync(stampPath) && readFileSync(stampPath, 'utf8').trim() === hash) {
    process.stdout.write(`build: ${target.out}/ is up to date with ${target.dirs.join('/ and ')}/ (tsc skipped)\n`)
    return 0
  }
  if (tsc === null) {
    process.stderr.write('build: the TypeScript compiler is not installed (npm ci installs it)\n')
    return 1
  }
  if (bundles && esbuild === null) {
    process.stderr.write('build: the bundler (esbuild) is not installed (npm ci installs it)\n')
    return 1
  }
  rmSync(stampPath, { force: true })
  const started = Date.now()
  const run = spawnSync(process.execPath, [tsc.tsc, '-p', join(root, target.tsconfig)], { cwd: root, stdio: 'inherit' })
  if (run.status !== 0) return run.status ?? 1
  if (bundles) {
    rmSync(join(root, 'dist', 'chunks'), { recursive: true, force: true })
    try {
      await bundle(root, esbuild.path)
    } catch (err) {
      process.stderr.write(`build: bundling dist/cli.js failed: ${err.message}\n`)
      return 1
    }
  }
  mkdirSync(dirname(stampPath), { recursive: true })
  writeFileSync(stampPath, `${hash}\n`)
  process.stdout.write(`build: ${target.out}/ compiled in ${((Date.now() - started) / 1000).toFixed(1)} s\n`)
  return 0
}

process.exitCode = await main()
