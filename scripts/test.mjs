#!/usr/bin/env node
/**
 * `npm test`: every compiled test file (dist-test/test/*.test.js), each in a Node process of its
 * own, run with `node` as a tap test file runs on its own: it prints TAP, a summary line
 * (`# { total, pass, fail, … }`) and exits non-zero when anything failed.
 *
 * Five files run at a time, at most two of them fleet files: those start etcd clusters,
 * Alertmanager and several sidecars each, and spend most of their time waiting on leases, watches
 * and elections, not on the CPU. The files known to take longest start first, so the run does
 * not end with one long file running alone (bench/README.md has the timings).
 * `BREAKWATER_TEST_JOBS` and `BREAKWATER_TEST_FLEET_JOBS` change the two numbers.
 *
 * Why not tap's own runner: it starts every test process with an import hook of its own
 * (`@tapjs/processinfo`, for coverage and process tracking, neither used here), which cost about
 * 1.2 s of CPU per test file on Node 20 — on two cores, most of a minute of the suite's wall time.
 * What the runner did that matters is kept: a time limit per file (`TAP_TIMEOUT`, 300 s, then the
 * file is killed), every file's TAP in the output (indented under `# Subtest: FILE`, failures and
 * all), a summary line in tap's own form, and the exit code. A file that exits but leaves a
 * process running with its output fails (10 s after it exited), rather than holding the run.
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

/** A positive whole number from the environment variable `name`, else `fallback`; anything else ends the run. */
function count (name, fallback) {
  const raw = process.env[name]
  if (raw === undefined || raw === '') return fallback
  if (!/^[1-9][0-9]*$/.test(raw)) {
    process.stderr.write(`npm test: ${name} must be a whole number of at least 1, not '${raw}'\n`)
    process.exit(2)
  }
  return Number(raw)
}

const DIR = join('dist-test', 'test')
const FLEET = /^fleet.*\.test\.js$/
/** Files at once, and how many of them may be fleet files. */
const JOBS = count('BREAKWATER_TEST_JOBS', 5)
const FLEET_JOBS = count('BREAKWATER_TEST_FLEET_JOBS', 2)
/**
 * The files that take longest (most of it waiting on timers, leases and child processes), longest
 * first: they start before the rest, so that no long file starts last and runs alone.
 * Only the order depends on this list; a file missing from it runs after these, in name order.
 */
const LONGEST_FIRST = [
  'incidents', 'fleet-incidents', 'fleet-faults', 'state-lock', 'lifecycle', 'fleet-alertmanager',
  'etcd-client', 'triggers', 'verification', 'logging', 'flag-provider', 'slow-clients', 'drill',
  'test-runner', 'persistence', 'fleet', 'drill-fleet', 'triage', 'fleet-failover', 'tls', 'tracing',
  'held', 'fleet-takeover', 'admin-token', 'fleet-status-page', 'operator-cli-mitigations',
  'build-stamp', 'operator-cli', 'fleet-rejoin', 'rollback', 'notifications', 'dockerfile'
]
/** tap's own limit per file, in seconds; past it and a minute more, the process is killed. */
const TIMEOUT_S = 300
const KILL_AFTER_MS = (TIMEOUT_S + 60) * 1000
/** How long a file's output may stay open after the file exited (see runFile). */
const LEFT_BEHIND_MS = 10_000

const { values, positionals } = parseArgs({ options: { grep: { type: 'string', multiple: true } }, allowPositionals: true })

/** The test files to run: all of them, or those named on the command line. */
function files () {
  const nameOf = (f) => f.replace(/\.test\.js$/, '')
  const rank = (f) => {
    const i = LONGEST_FIRST.indexOf(nameOf(f))
    return i === -1 ? LONGEST_FIRST.length : i
  }
  const all = readdirSync(DIR).filter((f) => f.endsWith('.test.js')).sort((a, b) => rank(a) - rank(b) || (a < b ? -1 : 1))
  if (positionals.length === 0) return all
  const wanted = positionals.map((p) => basename(p).replace(/\.(test\.)?(js|ts)$/, ''))
  const chosen = all.filter((f) => wanted.includes(nameOf(f)))
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
    let leaked = false
    const timer = setTimeout(() => { killed = true; child.kill('SIGKILL') }, KILL_AFTER_MS)
    // A process the file started and left running keeps its output open, and 'close' would wait
    // for that process to end (for ever, for a server): once the file has exited, its output
    // gets LEFT_BEHIND_MS to end, then the file fails, saying so.
    let leftBehind = null
    child.on('exit', () => {
      clearTimeout(timer)
      leftBehind = setTimeout(() => {
        leaked = true
        child.stdout.destroy()
        child.stderr.destroy()
        child.emit('close', child.exitCode, child.signalCode)
      }, LEFT_BEHIND_MS)
    })
    child.on('error', (err) => { output += `\ncannot run ${file}: ${err.message}\n` })
    let closed = false
    child.on('close', (code, signal) => {
      if (closed) return
      closed = true
      clearTimeout(timer)
      clearTimeout(leftBehind)
      children.delete(child)
      if (killed) output += `\n# killed after ${KILL_AFTER_MS / 1000} s\n`
      if (leaked) output += `\n# the file exited but left a process running that holds its output open (every test must stop what it starts)\n`
      resolve({ file, ok: code === 0 && !killed && !leaked, code: leaked && code === 0 ? 'left a process running' : code, signal, output, counts: summaryOf(output), ms: Date.now() - started })
    })
  })
}

/**
 * Run `list` in order, `jobs` files at a time and at most `fleetJobs` of them fleet files (a fleet
 * file waits for a fleet slot while the files after it go ahead); print each file's TAP as it
 * ends. Resolves with whether everything passed.
 */
function run (list, jobs, fleetJobs) {
  const started = Date.now()
  const totals = { total: 0, pass: 0, fail: 0, skip: 0, todo: 0 }
  const pending = [...list]
  let failed = 0
  let running = 0
  let fleetRunning = 0
  let n = 0
  return new Promise((resolve) => {
    const report = (result) => {
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
    const pump = () => {
      while (running < jobs) {
        const i = pending.findIndex((f) => !FLEET.test(f) || fleetRunning < fleetJobs)
        if (i === -1) break
        const [file] = pending.splice(i, 1)
        const fleet = FLEET.test(file)
        running++
        if (fleet) fleetRunning++
        runFile(file).then((result) => {
          running--
          if (fleet) fleetRunning--
          report(result)
          pump()
        })
      }
      if (running === 0 && pending.length === 0) {
        const shown = Object.entries(totals).filter(([key, value]) => key === 'total' || key === 'pass' || value > 0).map(([key, value]) => `${key}: ${value}`).join(', ')
        process.stdout.write(`# ${list.length} files, ${failed} failed, ${jobs} at a time (at most ${fleetJobs} fleet files)\n# { ${shown} }\n# time=${Date.now() - started}ms\n`)
        resolve(failed === 0 && totals.fail === 0)
      }
    }
    pump()
  })
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
  process.exitCode = (await run(list, JOBS, FLEET_JOBS)) ? 0 : 1
}
