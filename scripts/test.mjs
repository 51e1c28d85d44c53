#!/usr/bin/env node
/**
 * `npm test`: every compiled test file (dist-test/test/*.test.js), each in a Node process of its
 * own, run with `node` as a tap test file runs on its own: it prints TAP, a summary line
 * (`# { total, pass, fail, … }`) and exits non-zero when anything failed.
 *
 * The fleet files start etcd clusters, Alertmanager and several sidecars each, so they run one at
 * a time; the other files run three at a time beside them. Most of the fleet files' time is
 * waiting on leases, watches and elections, not CPU, so the two queues share the machine well.
 * The fleet drill (drill-fleet, one process of its own with its own etcd cluster) runs with the
 * other files: in the fleet queue it made that queue the longer one by about its own length.
 *
 * Why not tap's own runner: it starts every test process with an import hook of its own
 * (`@tapjs/processinfo`, for coverage and process tracking, neither used here), which cost about
 * 1.2 s of CPU per test file on Node 20 — on two cores, most of a minute of the suite's wall time.
 * What the runner did that matters is kept: a time limit per file (`TAP_TIMEOUT`, 300 s, then the
 * file is killed), every file's TAP in the output (indented under `# Subtest: FILE`, failures and
 * all), one summary line per queue in tap's own form, and the exit code.
 *
 *   npm test                          every file
 *   npm test -- FILE…                 these files (paths or names: `triggers`, `fleet.test.js`)
 *   npm test -- --grep PATTERN        only the subtests whose names match (tap's `--grep`;
 *                                     repeat it for nested levels)
 */
import { spawn, spawnSync } from 'node:child_process'
import { existsSync, readdirSync } from 'node:fs'
import { basename, join } from 'node:path'
import { parseArgs } from 'node:util'

const DIR = join('dist-test', 'test')
const FLEET = /^fleet.*\.test\.js$/
const JOBS = 3
/** tap's own limit per file, in seconds; past it and a minute more, the process is killed. */
const TIMEOUT_S = 300
const KILL_AFTER_MS = (TIMEOUT_S + 60) * 1000

const { values, positionals } = parseArgs({ options: { grep: { type: 'string', multiple: true } }, allowPositionals: true })

/** The test files to run: all of them, or those named on the command line. */
function files () {
  const all = readdirSync(DIR).filter((f) => f.endsWith('.test.js')).sort()
  if (positionals.length === 0) return all
  const wanted = positionals.map((p) => basename(p).replace(/\.(test\.)?(js|ts)$/, ''))
  const chosen = all.filter((f) => wanted.includes(f.replace(/\.test\.js$/, '')))
  const unknown = wanted.filter((w) => !all.includes(`${w}.test.js`))
  if (unknown.length > 0) throw new Error(`no compiled test file for: ${unknown.join(', ')} (in ${DIR})`)
  return chosen
}

/** `# { total: 5, pass: 4, skip: 1 }` → its counts; null when the line is not there. */
function summaryOf (output) {
  const lines = output.split('\n').filter((l) => l.startsWith('# { total:'))
  const last = lines.at(-1)
  if (last === undefined) return null
  const counts = {}
  for (const m of last.matchAll(/(\w+): (\d+)/g)) counts[m[1]] = Number(m[2])
  return counts
}

const children = new Set()

/** Run one test file; resolves with its exit status, its output and its counts. */
function runFile (file) {
  return new Promise((resolve) => {
    const started = Date.now()
    const env = { ...process.env, TAP_TIMEOUT: String(TIMEOUT_S) }
    if (values.grep !== undefined) env.TAP_GREP = values.grep.join('\n')
    const child = spawn(process.execPath, ['--enable-source-maps', join(DIR, file)], { env, stdio: ['ignore', 'pipe', 'pipe'] })
    children.add(child)
    let output = ''
    child.stdout.on('data', (c) => { output += c })
    child.stderr.on('data', (c) => { output += c })
    let killed = false
    const timer = setTimeout(() => { killed = true; child.kill('SIGKILL') }, KILL_AFTER_MS)
    child.on('error', (err) => { output += `\ncannot run ${file}: ${err.message}\n` })
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      children.delete(child)
      if (killed) output += `\n# killed after ${KILL_AFTER_MS / 1000} s\n`
      resolve({ file, ok: code === 0 && !killed, code, signal, output, counts: summaryOf(output), ms: Date.now() - started })
    })
  })
}

/** Run `list` `jobs` at a time; print each file's TAP as it ends; the queue's counts and whether all passed. */
async function queue (list, jobs, name) {
  const started = Date.now()
  const totals = { total: 0, pass: 0, fail: 0, skip: 0, todo: 0 }
  let failed = 0
  let next = 0
  let n = 0
  const worker = async () => {
    while (next < list.length) {
      const result = await runFile(list[next++])
      n++
      const indented = result.output.trimEnd().split('\n').map((l) => (l === '' ? l : `    ${l}`)).join('\n')
      const status = result.ok ? 'ok' : 'not ok'
      const why = result.ok ? '' : ` (exit ${result.code ?? result.signal})`
      process.stdout.write(`# Subtest: ${join(DIR, result.file)}\n${indented}\n${status} ${n} - ${join(DIR, result.file)}${why} # time=${result.ms}ms\n\n`)
      if (result.counts === null) {
        // It ended before tap could count: one failure, so the totals cannot read as a pass.
        totals.total++
        totals.fail++
      } else {
        for (const key of Object.keys(totals)) totals[key] += result.counts[key] ?? 0
      }
      if (!result.ok) failed++
    }
  }
  await Promise.all(Array.from({ length: Math.min(jobs, list.length) }, worker))
  const shown = Object.entries(totals).filter(([key, value]) => key === 'total' || key === 'pass' || value > 0).map(([key, value]) => `${key}: ${value}`).join(', ')
  process.stdout.write(`# ${name}: ${list.length} files, ${failed} failed\n# { ${shown} }\n# time=${Date.now() - started}ms\n`)
  return failed === 0 && totals.fail === 0
}

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    for (const child of children) child.kill('SIGKILL')
    process.exit(130)
  })
}

// tap builds itself for this project's plugin list the first time it runs after an install:
// build it once, before the test files import it.
const tapBin = join('node_modules', '.bin', 'tap')
const build = spawnSync(existsSync(tapBin) ? tapBin : 'tap', ['build'], { stdio: 'inherit' })
if (build.status !== 0) {
  process.stderr.write(`npm test: tap build failed${build.error !== undefined ? `: ${build.error.message}` : ''}\n`)
  process.exitCode = 1
} else {
  let list
  try {
    list = files()
  } catch (err) {
    process.stderr.write(`npm test: ${err.message}\n`)
    process.exit(2)
  }
  process.stdout.write('TAP version 14\n')
  const results = await Promise.all([
    queue(list.filter((f) => !FLEET.test(f)), JOBS, 'the files beside the fleet files'),
    queue(list.filter((f) => FLEET.test(f)), 1, 'the fleet files, one at a time')
  ])
  process.exitCode = results.every(Boolean) ? 0 : 1
}
