// ESLint flat config (`npm run lint`). TypeScript files are linted with type
// information from tsconfig.test.json (the sources plus the tests):
// typescript-eslint's recommended-type-checked set plus a few rules that
// catch real bugs. The plain-Node scripts (.mjs) get the same rules minus
// those that need types: they are not type-checked.
import js from '@eslint/js';
import globals from 'globals';
import tseslint from 'typescript-eslint';

/**
 * Beyond recommended-type-checked (which already has no-floating-promises,
 * no-misused-promises, await-thenable, only-throw-error, no-base-to-string,
 * no-for-in-array, the no-unsafe-* family ...).
 */
const typedRules = {
  // `return promise` inside try/catch/finally skips the catch and runs the finally too early.
  '@typescript-eslint/return-await': ['error', 'in-try-catch'],
  // A switch over an enum that misses a member (a new extent kind, say) must say so with a default.
  '@typescript-eslint/switch-exhaustiveness-check': ['error', { considerDefaultExhaustiveForUnions: true }],
  // Re-rejecting a caught error is fine: it is whatever the failed call threw.
  '@typescript-eslint/prefer-promise-reject-errors': ['error', { allowThrowingUnknown: true }],
  // Off: an async function without await still turns a throw into a
  // rejection, which callers rely on; dropping `async` would change that.
  '@typescript-eslint/require-await': 'off',
  // Off: a `!` after an index access (`fields[4]!`) marks where the code
  // relies on the index being in range. Without noUncheckedIndexedAccess in
  // the tsconfig the rule calls each one unnecessary and would remove them.
  '@typescript-eslint/no-unnecessary-type-assertion': 'off',
};

/** Rules that catch real bugs without type information (beyond the recommended sets). */
const plainRules = {
  '@typescript-eslint/no-unused-vars': [
    'error',
    { args: 'after-used', argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none', destructuredArrayIgnorePattern: '^_', ignoreRestSiblings: true },
  ],
  eqeqeq: ['error', 'always', { null: 'ignore' }],
  'no-self-compare': 'error',
  'no-unmodified-loop-condition': 'error',
  'no-unreachable-loop': 'error',
  'no-template-curly-in-string': 'error',
  'array-callback-return': 'error',
  'no-constructor-return': 'error',
  // Off: the code matches control characters on purpose (escaping untrusted
  // names for a terminal, C strings in headers).
  'no-control-regex': 'off',
};

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', 'native/**/build/**', '.tmp/**', 'bench-results/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommendedTypeChecked,
  {
    rules: plainRules,
  },
  {
    languageOptions: {
      parserOptions: {
        project: './tsconfig.test.json',
        tsconfigRootDir: import.meta.dirname,
      },
    },
    rules: typedRules,
  },
  {
    // Tests patch prototypes (ImageFile's I/O methods) and keep the originals
    // to call with .apply: unbound on purpose.
    files: ['test/**/*.ts'],
    rules: { '@typescript-eslint/unbound-method': 'off' },
  },
  {
    files: ['**/*.mjs'],
    ...tseslint.configs.disableTypeChecked,
  },
  {
    files: ['**/*.mjs'],
    languageOptions: {
      globals: globals.node,
    },
  },
);
