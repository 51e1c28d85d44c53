#!/usr/bin/env node
/**
 * `npm test`: the compiled suite in two tap runs side by side. The fleet files start etcd
 * clusters, Alertmanager and several sidecars each, so they run one at a time; the other files
 * run three at a time beside them. Most of the fleet files' time is waiting on leases, watches
 * and elections, not CPU, so the two runs share the machine well. Exit 0 only when both pass.
 */
import { spawn } from 'node:child_process'

const FLEET = 'dist-test/test/@(fleet*|drill-fleet).test.js'
const REST = 'dist-test/test/!(fleet*|drill-fleet).test.js'

/** One tap run with `args` (tap from node_modules/.bin, which npm puts on PATH); its exit code. */
function tap (args) {
  return new Promise((resolve) => {
    const child = spawn('tap', args, { stdio: 'inherit' })
    child.on('error', (err) => {
      process.stderr.write(`npm test: cannot run tap: ${err.message}\n`)
      resolve(1)
    })
    child.on('exit', (code, signal) => { resolve(code ?? (signal === null ? 1 : 128)) })
  })
}

// tap rebuilds its runner for this project's plugin list the first time it runs after an install;
// two runs starting at once would both rebuild into the same folder. Build it once, first.
if (await tap(['build']) !== 0) {
  process.exitCode = 1
} else {
  // Arguments given to `npm test -- …` go to both runs.
  const extra = process.argv.slice(2)
  const codes = await Promise.all([tap([REST, ...extra]), tap(['--jobs', '1', FLEET, ...extra])])
  process.exitCode = codes.every((c) => c === 0) ? 0 : 1
}
