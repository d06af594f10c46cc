/**
 * mount/options.ts: the -o allow-list, the generic mount options mount(8)
 * and mount.fuse pass (accepted, ignored), and how each backend renders them.
 */
import { describe, expect, it } from 'vitest';
import { fuse3OptionList, fuseOptionList, parseMountOptions } from '../../mount/options.js';

describe('parseMountOptions', () => {
  it('accepts what mount.fuse passes for an fstab line (rw,dev,suid plus atime and sync flags) and ignores it', () => {
    const o = parseMountOptions(['rw,noatime,dev,suid', 'nosuid,nodev,relatime,sync,dirsync,lazytime,noexec', 'defaults,noauto,nofail,_netdev,user,x-systemd.automount,x-gvfs-show,comment=x']);
    expect(o).toEqual(parseMountOptions([]));
  });

  it('ro applies; the qmount options keep their meaning next to generic ones', () => {
    const o = parseMountOptions(['ro,noatime,nofail', 'umask=027,uid=5']);
    expect(o).toMatchObject({ readOnly: true, umask: '027', uid: 5 });
  });

  it('refuses unknown options and values on flags', () => {
    expect(() => parseMountOptions(['bogus'])).toThrow(/unknown mount option "bogus"/);
    expect(() => parseMountOptions(['nofail=1'])).toThrow(/unknown mount option "nofail"/);
    expect(() => parseMountOptions(['ro=1'])).toThrow(/takes no value/);
  });
});

describe('rendered option lists', () => {
  it('fsname is the image path, with commas and backslashes escaped for libfuse', () => {
    const o = { ...parseMountOptions([]), source: '/img/a,b\\c.qcow2' };
    expect(fuse3OptionList(o, true)[0]).toBe('fsname=/img/a\\,b\\\\c.qcow2');
    expect(fuseOptionList(o, false)[0]).toBe('fsname=/img/a\\,b\\\\c.qcow2');
    expect(fuse3OptionList(o, true)).toContain('subtype=qmount');
  });

  it('libfuse 2 does not get umask (its umask would make disk.raw executable): the service answers with it', () => {
    const list = fuseOptionList(parseMountOptions(['umask=027,uid=1,gid=2']), false);
    expect(list.some((x) => x.startsWith('umask') || x.startsWith('uid') || x.startsWith('gid'))).toBe(false);
  });
});
