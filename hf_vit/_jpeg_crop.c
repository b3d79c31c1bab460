/* Decode only the part of a JPEG that a crop needs, with libjpeg-turbo's partial decoding.
 *
 * A random-resized crop uses on average about half of a photo, yet a full decode pays for every pixel. libjpeg-turbo
 * (since 1.5) can skip the IDCT and colour conversion of the rows above the crop (jpeg_skip_scanlines) and of the
 * columns beside it (jpeg_crop_scanline), and we stop reading at the crop's last row, so the rows below are not even
 * entropy-decoded. No Python binding exposes this (Pillow, simplejpeg, PyTurboJPEG, imagecodecs, OpenCV: checked), so
 * this is the one piece of C in the project. It is optional: without it (no libjpeg headers at install time) the
 * pipeline decodes the whole image instead, with the same pixels.
 *
 * decode_crop(data, reduce, top, left, height, width, grey) -> bytearray of height * width * (1 if grey else 3)
 * uint8, row-major, channels last: the box [top, top + height) x [left, left + width) of the image decoded at
 * 1/reduce of its size (reduce in 1, 2, 4, 8; the box is in that reduced grid). Raises ValueError for anything
 * libjpeg-turbo reports, warnings included (corrupt data it would paper over), so that the caller can hand the image
 * to the decoder that decides what is corrupt for every other image. The decoding runs without the GIL (two threads
 * decode twice as fast as one; measured).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf escape;
    int warnings;
    char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void on_error(j_common_ptr cinfo) {
    ErrorManager *err = (ErrorManager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->escape, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    ErrorManager *err = (ErrorManager *)cinfo->err;
    if (level < 0 && err->warnings++ == 0) /* level -1 is a warning; >= 0 are trace messages, ignored */
        (*cinfo->err->format_message)(cinfo, err->message);
}

/* Decode the box into dst (height * width * channels bytes). No Python API inside: it runs without the GIL.
 * Returns 0, or -1 with the reason in err->message. */
static int decode_into(const unsigned char *data, size_t size, int reduce, int top, int left, int height, int width,
                       int grey, unsigned char *dst, ErrorManager *err) {
    struct jpeg_decompress_struct cinfo;
    /* Written after setjmp and read after longjmp: volatile, so that the value survives the jump. */
    JSAMPROW volatile row = NULL;

    cinfo.err = jpeg_std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_message;
    err->warnings = 0;
    err->message[0] = '\0';
    jpeg_create_decompress(&cinfo);
    if (setjmp(err->escape)) {
        jpeg_destroy_decompress(&cinfo);
        free(row);
        return -1;
    }

    jpeg_mem_src(&cinfo, data, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_RGB &&
        cinfo.jpeg_color_space != JCS_GRAYSCALE) {
        strcpy(err->message, "colour space other than YCbCr, RGB or grey");
        longjmp(err->escape, 1);
    }
    cinfo.out_color_space = grey ? JCS_GRAYSCALE : JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)reduce;
    jpeg_start_decompress(&cinfo);
    if (top < 0 || left < 0 || height <= 0 || width <= 0 || (JDIMENSION)(top + height) > cinfo.output_height ||
        (JDIMENSION)(left + width) > cinfo.output_width) {
        snprintf(err->message, JMSG_LENGTH_MAX, "box (%d, %d, %d, %d) outside the %ux%u image", top, left, height,
                 width, cinfo.output_height, cinfo.output_width);
        longjmp(err->escape, 1);
    }

    /* Decode a few columns more on each side: at the edges of a cropped decode, fancy upsampling of subsampled chroma
     * (4:2:0, 4:2:2) lacks its neighbouring chroma sample and gives other values than the full decode; CROP_MARGIN
     * covers one chroma sample at the widest subsampling (4 pixels). The decoder then widens the range to whole iMCUs;
     * remember where our columns start inside it. */
    enum { CROP_MARGIN = 8 };
    JDIMENSION x = left > CROP_MARGIN ? (JDIMENSION)(left - CROP_MARGIN) : 0;
    JDIMENSION end = (JDIMENSION)(left + width + CROP_MARGIN);
    if (end > cinfo.output_width)
        end = cinfo.output_width;
    JDIMENSION decoded_width = end - x;
    jpeg_crop_scanline(&cinfo, &x, &decoded_width);
    const size_t channels = (size_t)cinfo.output_components;
    const size_t out_row = (size_t)width * channels;
    row = (JSAMPROW)malloc((size_t)decoded_width * channels);
    if (row == NULL) {
        strcpy(err->message, "out of memory");
        longjmp(err->escape, 1);
    }
    if (top > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)top) != (JDIMENSION)top) {
        strcpy(err->message, "could not skip to the crop's first row");
        longjmp(err->escape, 1);
    }
    const size_t offset = ((size_t)left - (size_t)x) * channels;
    for (int r = 0; r < height; r++) {
        JSAMPROW rows[1] = {row};
        if (jpeg_read_scanlines(&cinfo, rows, 1) != 1) {
            strcpy(err->message, "data ended inside the crop");
            longjmp(err->escape, 1);
        }
        memcpy(dst + (size_t)r * out_row, row + offset, out_row);
    }
    if (err->warnings) /* the message of the first warning is in err->message already */
        longjmp(err->escape, 1);
    /* Stop here: the rows below the crop are never decoded. */
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    free(row);
    return 0;
}

static PyObject *decode_crop(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer data;
    int reduce, top, left, height, width, grey;
    if (!PyArg_ParseTuple(args, "y*iiiiip", &data, &reduce, &top, &left, &height, &width, &grey))
        return NULL;
    if (reduce != 1 && reduce != 2 && reduce != 4 && reduce != 8) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "libjpeg: reduce must be 1, 2, 4 or 8 (got %d)", reduce);
    }
    if (height <= 0 || width <= 0) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "libjpeg: box (%d, %d, %d, %d) outside the image: empty", top, left,
                            height, width);
    }
    /* The output's size is known before decoding (grey: one channel, else RGB), so it is allocated first and the
     * decoding runs without the GIL. */
    PyObject *out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)height * width * (grey ? 1 : 3));
    if (out == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    ErrorManager err;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = decode_into((const unsigned char *)data.buf, (size_t)data.len, reduce, top, left, height, width, grey,
                         (unsigned char *)PyByteArray_AS_STRING(out), &err);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (status != 0) {
        Py_DECREF(out);
        return PyErr_Format(PyExc_ValueError, "libjpeg: %s", err.message);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"decode_crop", decode_crop, METH_VARARGS,
     "decode_crop(data, reduce, top, left, height, width, grey) -> bytearray: the box of the JPEG decoded at "
     "1/reduce of its size, uint8 (height, width, 1 or 3), decoding as little of the image as libjpeg-turbo allows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_crop", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__jpeg_crop(void) { return PyModule_Create(&module); }
