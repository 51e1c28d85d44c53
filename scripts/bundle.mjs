// Bundle the `breakwater` command: dist/cli.js (tsc's output) and what it imports, Breakwater's
// own modules and its dependencies alike, become one ES module, dist/cli.js, plus the chunks in
// dist/chunks/ that it loads with `await import()` only when a config or command needs them
// (YAML, tracing, the flag file's evaluator, the fleet, the operator commands, the drills).
//
// Why: Node loading a few thousand small files (undici, fastify, prom-client, pino, typebox...)
// keeps more memory than the same code in a few large files; bench/README.md has the figures.
// The rest of dist/ stays tsc's output: the library (`main`), the tests and the schema generator
// use it.
//
// Left outside the bundle, loaded from node_modules as before:
//   - etcd3 (the fleet): it reads its .proto file next to its own code at load time;
//   - a flagProvider module: the config names it, so it is found at run time.
import { builtinModules, createRequire } from 'node:module'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

export const EXTERNAL = ['etcd3']

/**
 * `await import('pkg')` of a CommonJS package would, in its own chunk, expose only `default`;
 * such a package is reached through a small ES module that names its exports, as Node's own
 * import of it does.
 */
function lazyPackages (root) {
  const require = createRequire(join(root, 'package.json'))
  return {
    name: 'lazy-packages',
    setup (build) {
      build.onResolve({ filter: /^[^./]/ }, (args) => {
        if (args.kind !== 'dynamic-import' || args.namespace === 'lazy' || EXTERNAL.includes(args.path)) return undefined
        if (args.path.startsWith('node:') || builtinModules.includes(args.path)) return undefined
        return { path: args.path, namespace: 'lazy' }
      })
      build.onLoad({ filter: /.*/, namespace: 'lazy' }, async (args) => {
        const mod = await import(pathToFileURL(require.resolve(args.path)).href)
        const names = Object.keys(mod).filter((n) => n !== 'default' && /^[A-Za-z_$][\w$]*$/.test(n))
        return { contents: `import * as m from ${JSON.stringify(args.path)}\nexport const { ${names.join(', ')} } = m\n`, resolveDir: root }
      })
    }
  }
}

/** The bundler, resolved from the project; null when it is not installed. */
export function bundler (root) {
  try {
    const require = createRequire(join(root, 'package.json'))
    return { path: require.resolve('esbuild'), version: require('esbuild/package.json').version }
  } catch {
    return null
  }
}

/** Bundle `root`/dist/cli.js in place. Resolves to the number of files written. */
export async function bundle (root, esbuildPath) {
  const { build } = await import(pathToFileURL(esbuildPath).href)
  const result = await build({
    absWorkingDir: root,
    entryPoints: { cli: join(root, 'dist', 'cli.js') },
    outdir: join(root, 'dist'),
    allowOverwrite: true,
    chunkNames: 'chunks/[name]-[hash]',
    bundle: true,
    splitting: true,
    format: 'esm',
    platform: 'node',
    target: 'node20',
    // Class and function names stay as written: log lines and errors show them.
    keepNames: true,
    external: EXTERNAL,
    plugins: [lazyPackages(root)],
    // The CommonJS dependencies call require() for Node's modules.
    banner: { js: "import { createRequire as __bundleRequire } from 'node:module'; const require = __bundleRequire(import.meta.url);" },
    metafile: true,
    logLevel: 'warning'
  })
  return Object.keys(result.metafile.outputs).length
}
